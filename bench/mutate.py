"""Mutation testing of the core modules with mutmut 3: the score per module, survivors listed.

Too slow for CI (minutes to an hour per module on 2 cores); run it on demand:

    .venv/bin/pip install 'mutmut>=3.8,<4'
    .venv/bin/python bench/mutate.py                 # every core module
    .venv/bin/python bench/mutate.py dispatch tokens # some of them
    .venv/bin/python bench/mutate.py --show dispatch # print each survivor's diff too

Each module is mutated in its own scratch copy of the working tree (tracked and untracked,
not ignored files), with a `[tool.mutmut]` block that mutates that one file and selects the
tests that exercise it; mutmut then runs, per mutant, only the tests that reach the mutated
function. Tests that start `mailer` as a subprocess import the unmutated package, so what they
alone would kill counts as surviving here: the score is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# module name -> (file, the tests that exercise it)
CORE: dict[str, tuple[str, list[str]]] = {
    "dispatch": ("mailer/dispatch.py", ["tests/test_dispatch.py"]),
    "transport": ("mailer/transport.py", ["tests/test_transport.py", "tests/test_dispatch.py"]),
    "compose": ("mailer/compose.py", ["tests/test_compose.py", "tests/test_calendar.py",
                                      "tests/test_trust_privacy.py"]),
    # Only the tests that pin the module's own promises: a scheduler test reaching a trigger
    # costs seconds per mutant and kills nothing test_triggers does not.
    "triggers": ("mailer/triggers.py", ["tests/test_triggers.py"]),
    "scheduler": ("mailer/scheduler.py", ["tests/test_scheduler.py"]),
    "web-security": ("mailer/web/security.py", ["tests/test_web_security.py",
                                                "tests/test_web.py"]),
    "queries": ("mailer/store/queries.py", ["tests/test_store.py", "tests/test_dispatch.py",
                                            "tests/test_subscribers.py"]),
    "tokens": ("mailer/tokens.py", ["tests/test_trust_privacy.py", "tests/test_web.py"]),
    "yamlsrc": ("mailer/yamlsrc.py", ["tests/test_yaml_budget.py", "tests/test_campaign.py"]),
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


def mutmut_block(source: str, tests: list[str]) -> str:
    existing = [t for t in tests if (REPO / t).exists()]
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["mailer/"]\n'
        f"only_mutate = {json.dumps([source])}\n"
        'also_copy = ["templates/", "lists/", "campaigns/", "config.yaml", "bench/"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(existing)}\n"
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider"]\n'
        "timeout_multiplier = 5.0\n"
        "use_git_change_detection = false\n"
    )


def run_module(name: str, *, children: int, show: bool, keep: bool) -> dict[str, object]:
    source, tests = CORE[name]
    work = Path(tempfile.mkdtemp(prefix=f"mutate-{name}-"))
    try:
        scratch_copy(work)
        with (work / "pyproject.toml").open("a", encoding="utf-8") as fh:
            fh.write(mutmut_block(source, tests))
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("MAILER_CONFIG", None)
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                              str(children)], cwd=work, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if run.returncode != 0:
            tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
            return {"module": name, "error": "\n".join(tail), "seconds": elapsed}
        subprocess.run([sys.executable, "-m", "mutmut", "export-cicd-stats"], cwd=work, env=env,
                       check=True, capture_output=True)
        stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
        listing = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, env=env,
                                 check=True, capture_output=True, text=True).stdout
        survivors = [line.strip().split(":")[0] for line in listing.splitlines()
                     if line.strip().endswith(("survived", "no tests"))]
        diffs = {}
        if show:
            for mutant in survivors:
                diffs[mutant] = subprocess.run(
                    [sys.executable, "-m", "mutmut", "show", mutant], cwd=work, env=env,
                    capture_output=True, text=True).stdout
        return {"module": name, "stats": stats, "survivors": survivors, "diffs": diffs,
                "seconds": elapsed}
    finally:
        if keep:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def score(stats: dict[str, int]) -> tuple[int, int, float]:
    killed = int(stats.get("killed", 0)) + int(stats.get("timeout", 0))
    tested = killed + int(stats.get("survived", 0)) + int(stats.get("no_tests", 0))
    return killed, tested, 100.0 * killed / tested if tested else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", choices=[[], *CORE], default=[],
                        help="core modules to mutate (default: all)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    names = args.modules or list(CORE)
    results = []
    for name in names:
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
