"""Mutation testing of the core modules with mutmut 3: the score per module, survivors listed.

Too slow for CI (minutes to an hour per module on 2 cores); run it on demand:

    .venv/bin/pip install 'mutmut>=3.8,<4'
    .venv/bin/python bench/mutate.py                 # every core module
    .venv/bin/python bench/mutate.py dispatch tokens # some of them
    .venv/bin/python bench/mutate.py --show dispatch # print each survivor's diff too
    .venv/bin/python bench/mutate.py --keep dispatch # keep the scratch copy, then after
    .venv/bin/python bench/mutate.py --recheck /tmp/mutate-dispatch-XXXX  # new tests:
                                                     # only the survivors run again

Each module is mutated in its own scratch copy of the working tree (tracked and untracked,
not ignored files), with a `[tool.mutmut]` block that mutates its files and selects the
tests that exercise them; mutmut then runs, per mutant, only the tests that reach the mutated
function. Tests that start `mailer` as a subprocess import the unmutated package, so what they
alone would kill counts as surviving here: the score is a lower bound.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# module name -> (its files, the tests that exercise them)
CORE: dict[str, tuple[list[str], list[str]]] = {
    "dispatch": (["mailer/dispatch.py"], ["tests/test_dispatch.py"]),
    "transport": (["mailer/transport.py", "mailer/smtp_session.py"],
                  ["tests/test_transport.py", "tests/test_smtp_session.py"]),
    "compose": (["mailer/compose.py"], ["tests/test_compose.py", "tests/test_calendar.py",
                                        "tests/test_trust_privacy.py"]),
    # Only the tests that pin the module's own promises: a scheduler test reaching a trigger
    # costs seconds per mutant and kills nothing test_triggers does not.
    "triggers": (["mailer/triggers.py"], ["tests/test_triggers.py"]),
    # The decisions (SCOPE below), pinned directly; the Runner's wiring is test_scheduler's.
    "scheduler": (["mailer/scheduler.py", "mailer/jobs.py", "mailer/leader.py",
                   "mailer/schedule_view.py", "mailer/logs.py"],
                  ["tests/test_scheduler_decisions.py"]),
    "web-security": (["mailer/web/security.py"], ["tests/test_web_security.py",
                                                  "tests/test_web.py"]),
    "queries": (["mailer/store/queries.py"], ["tests/test_queries.py", "tests/test_store.py"]),
    "tokens": (["mailer/tokens.py"], ["tests/test_trust_privacy.py", "tests/test_web.py",
                                      "tests/test_bounces.py"]),
    "yamlsrc": (["mailer/yamlsrc.py"], ["tests/test_yaml_budget.py", "tests/test_campaign.py"]),
    # Stage 2 per recipient (SCOPE below): the sandbox and the short cut beside jinja.
    "stage2": (["mailer/render.py"], ["tests/test_trust_campaign.py", "tests/test_compose.py"]),
}

# module name -> the functions mutated (mutmut mutant-name globs); absent: the whole files.
SCOPE: dict[str, list[str]] = {
    "scheduler": [f"mailer.{module}.{name}__mutmut_*" for module, names in (
        ("logs", ["x_log_event"]),
        ("jobs", ["x_trigger_for", "x_fingerprint", "x_next_fire", "x_is_fire_time",
                  "x_occurrence_of", "x_decide", "x_one_off_done", "xǁCampaignJobsǁlost_fires",
                  "x_kept_jobs", "x_file_problem", "x_local_isoformat", "x_utc_isoformat",
                  "x_schedule_text"]),
        ("leader", ["xǁFileLeaderǁtry_acquire", "xǁFileLeaderǁheld", "xǁFileLeaderǁrelease",
                    "xǁPostgresLeaderǁtry_acquire", "xǁPostgresLeaderǁheld",
                    "xǁPostgresLeaderǁrelease", "xǁPostgresLeaderǁ_drop", "x_leader_for"]),
        ("scheduler", ["x_note_run", "x_failed_fires", "x_failure_reason",
                       "xǁRunnerǁ_record_failure"]),
        ("schedule_view", ["x_schedule_overview", "x__overview_row", "x_no_next_fire"]),
    ) for name in names],
    "stage2": [f"mailer.render.{name}__mutmut_*" for name in (
        "xǁStage2Templateǁgenerate", "xǁStage2Templateǁrender", "xǁStage2Templateǁ_fill",
        "xǁStage2Templateǁliteral_pieces", "x__expand", "x__plan", "x__steps", "x__field",
        "x_static_text", "x_personalise_pieces", "xǁ_StaffSandboxǁgetattr",
        "xǁ_StaffSandboxǁgetitem", "x_staff_template_problem")],
}


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if (REPO / line).is_file()]


def scratch_copy(target: Path) -> None:
    for name in project_files():
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest)


def mutmut_block(sources: list[str], tests: list[str]) -> str:
    existing = [t for t in tests if (REPO / t).exists()]
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["mailer/"]\n'
        f"only_mutate = {json.dumps(sources)}\n"
        'also_copy = ["templates/", "lists/", "campaigns/", "config.yaml", "bench/"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(existing)}\n"
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider"]\n'
        "timeout_multiplier = 5.0\n"
        "use_git_change_detection = false\n"
    )


def run_module(name: str, *, children: int, show: bool, keep: bool) -> dict[str, object]:
    sources, tests = CORE[name]
    work = Path(tempfile.mkdtemp(prefix=f"mutate-{name}-"))
    try:
        scratch_copy(work)
        with (work / "pyproject.toml").open("a", encoding="utf-8") as fh:
            fh.write(mutmut_block(sources, tests))
        return mutmut_run(name, work, SCOPE.get(name, []), children=children, show=show)
    finally:
        if keep:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def recheck(work: Path, *, children: int, show: bool) -> dict[str, object]:
    """Run a kept copy's survivors again against the tests as they are now in the tree."""
    name = next((n for n in CORE if work.name.startswith(f"mutate-{n}-")), None)
    if name is None:
        raise SystemExit(f"{work} is not a copy kept by this script (mutate-MODULE-…)")
    for source in CORE[name][0]:
        if (work / source).read_bytes() != (REPO / source).read_bytes():
            raise SystemExit(f"{source} changed since {work} was made: run the module again")
    for test in sorted((REPO / "tests").rglob("*.py")):
        for base in (work, work / "mutants"):
            dest = base / test.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(test, dest)
    previous = [m for m in survivors_of(work, {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                if in_scope(name, m)]
    return mutmut_run(name, work, previous, children=children, show=show, reuse=not previous)


def survivors_of(work: Path, env: dict[str, str]) -> list[str]:
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, env=env,
                             check=True, capture_output=True, text=True).stdout
    return [line.strip().split(":")[0] for line in listing.splitlines()
            if line.strip().endswith(("survived", "no tests"))]


def mutmut_run(name: str, work: Path, patterns: list[str], *, children: int, show: bool,
               reuse: bool = False) -> dict[str, object]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MAILER_CONFIG", None)
    started = time.monotonic()
    if not reuse:
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                              str(children), *patterns], cwd=work, env=env,
                             capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
            return {"module": name, "error": "\n".join(tail),
                    "seconds": time.monotonic() - started}
    elapsed = time.monotonic() - started
    stats = scoped_stats(work, name)
    survivors = [m for m in survivors_of(work, env) if in_scope(name, m)]
    diffs = {}
    if show:
        for mutant in survivors:
            diffs[mutant] = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant],
                                           cwd=work, env=env, capture_output=True,
                                           text=True).stdout
    return {"module": name, "stats": stats, "survivors": survivors, "diffs": diffs,
            "seconds": elapsed}


def in_scope(name: str, mutant: str) -> bool:
    return not SCOPE.get(name) or any(fnmatch.fnmatch(mutant, p) for p in SCOPE[name])


def scoped_stats(work: Path, name: str) -> dict[str, int]:
    """Counts by mutmut's own status names over the module's mutants in scope that ran."""
    from mutmut.stats import status_by_exit_code

    counts: dict[str, int] = {}
    for source in CORE[name][0]:
        meta = json.loads((work / "mutants" / f"{source}.meta").read_text())
        for key, code in meta["exit_code_by_key"].items():
            if code is not None and in_scope(name, key):
                status = status_by_exit_code[code].replace(" ", "_")
                counts[status] = counts.get(status, 0) + 1
    return counts


def score(stats: dict[str, int]) -> tuple[int, int, float]:
    killed = sum(stats.get(k, 0) for k in ("killed", "timeout", "caught_by_type_check",
                                           "segfault"))
    tested = killed + sum(stats.get(k, 0) for k in ("survived", "no_tests", "suspicious"))
    return killed, tested, 100.0 * killed / tested if tested else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", choices=[[], *CORE], default=[],
                        help="core modules to mutate (default: all)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--recheck", type=Path, metavar="DIR",
                        help="a copy kept with --keep: run its survivors against today's tests")
    args = parser.parse_args()
    names = args.modules or list(CORE)
    results = []
    for name in names if args.recheck is None else [""]:
        if args.recheck is not None:
            result = recheck(args.recheck, children=args.children, show=args.show)
            name = str(result["module"])
        else:
            result = run_module(name, children=args.children, show=args.show, keep=args.keep)
        results.append(result)
        if "error" in result:
            print(f"{name:14s} ERROR after {result['seconds']:.0f} s:\n{result['error']}")
            continue
        killed, tested, pct = score(result["stats"])  # type: ignore[arg-type]
        print(f"{name:14s} {pct:5.1f} %  killed {killed} of {tested}  "
              f"({result['seconds']:.0f} s)", flush=True)
        for mutant in result["survivors"]:  # type: ignore[attr-defined]
            print(f"    survived: {mutant}")
            if args.show:
                print(result["diffs"][mutant])  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
