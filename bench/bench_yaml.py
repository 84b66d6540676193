"""Issue 8 benchmark: the YAML budget refuses a ~400-byte alias bomb fast and small.

    .venv/bin/python bench/bench_yaml.py [--runs 5] [--before REV] [--limit-mb 1024]

Every measurement is one fresh child process (`--child`), so peak RSS (`resource.getrusage`,
ru_maxrss of the child) belongs to that one load; the child reports its RSS after imports too,
so the load's own share can be read off. Time is `time.perf_counter()` around `load_yaml` alone.

  * bomb: 9 anchors of 9 aliases each ("billion laughs", ~400 bytes, 9^9 strings if expanded),
    through `load_yaml` with the campaign budget: must be refused (CampaignError);
  * campaign: the largest shipped campaign under campaigns/, same loader, same run: the ratio
    bomb / campaign says what refusing a bomb costs next to reading a real file.

`--before REV` also runs the bomb and the campaign through `mailer/yamlsrc.py` as it was at REV
(e.g. the commit before the budgets), once each, with RLIMIT_AS = --limit-mb and a --timeout-s,
so the old behaviour is measured without eating the machine.
Target (issue 8): refused in well under a second, under 100 MB peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, Stats, loadavg  # noqa: E402


def alias_bomb() -> str:
    lines = ["l0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    lines += [f"l{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def shipped_campaign() -> Path:
    return max((REPO / "campaigns").glob("*.yaml"), key=lambda p: p.stat().st_size)


# --- the child: one load, measured --------------------------------------------------------------


def child(path: Path, old_source: str | None, limit_mb: int) -> None:
    if limit_mb:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))
    from mailer.errors import CampaignError

    if old_source:  # the loader as it was, imported as a module of the mailer package
        spec = importlib.util.spec_from_file_location("mailer._yamlsrc_before", old_source)
        assert spec and spec.loader
        loader: Any = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loader  # dataclasses look their module up there
        spec.loader.exec_module(loader)
    else:
        from mailer import yamlsrc as loader
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        loader.load_yaml(path, error=CampaignError)
        outcome = "loaded"
    except CampaignError as exc:
        outcome = f"refused: {exc.message}"
    except BaseException as exc:  # what the old loader did: MemoryError, RecursionError, …
        outcome = f"{type(exc).__name__}"
    elapsed = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"s": elapsed, "outcome": outcome, "base_mb": base_kb / 1024,
                      "peak_mb": peak_kb / 1024}))


# --- the parent ---------------------------------------------------------------------------------


def measure(path: Path, *, old_source: str | None = None, limit_mb: int = 0,
            timeout_s: float = 60) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(path), "--limit-mb", str(limit_mb)]
    if old_source:
        cmd += ["--old-source", old_source]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"s": time.perf_counter() - started, "outcome": f"timeout after {timeout_s:g} s",
                "base_mb": float("nan"), "peak_mb": float("nan")}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"s": time.perf_counter() - started, "outcome": f"child died: {tail[:120]}",
                "base_mb": float("nan"), "peak_mb": float("nan")}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def summary(name: str, results: list[dict[str, Any]]) -> tuple[Stats, Stats]:
    times = Stats([r["s"] for r in results])
    peaks = Stats([r["peak_mb"] for r in results])
    base = statistics.median(r["base_mb"] for r in results)
    outcomes = sorted({r["outcome"][:110] for r in results})
    print(f"{name}:")
    print(f"  time     {times.fmt(' ms', 1000, 2)}")
    print(f"  peak RSS {peaks.fmt(' MB')}; after imports {base:.1f} MB")
    for outcome in outcomes:
        print(f"  outcome  {outcome}")
    return times, peaks


def before(rev: str, bomb: Path, campaign: Path, *, limit_mb: int, timeout_s: float,
           tmp: Path) -> None:
    source = subprocess.run(["git", "show", f"{rev}:mailer/yamlsrc.py"], capture_output=True,
                            text=True, cwd=REPO, check=True).stdout
    old = tmp / "yamlsrc_before.py"
    old.write_text(source, encoding="utf-8")
    print(f"\nbefore ({rev}), one run each, RLIMIT_AS {limit_mb} MB, timeout {timeout_s:g} s:")
    for name, path in (("campaign", campaign), ("bomb", bomb)):
        r = measure(path, old_source=str(old), limit_mb=limit_mb, timeout_s=timeout_s)
        print(f"  {name:8} {r['s']:8.2f} s  peak RSS {r['peak_mb']:7.1f} MB  {r['outcome'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also measure yamlsrc.py at this commit")
    parser.add_argument("--limit-mb", type=int, default=1024, help="RLIMIT_AS for --before")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per child, --before")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--old-source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.old_source, args.limit_mb if args.old_source else 0)
        return

    import tempfile

    print(f"bench_yaml: {loadavg()}")
    campaign = shipped_campaign()
    with tempfile.TemporaryDirectory() as tmp:
        bomb = Path(tmp) / "bomb.yaml"
        bomb.write_text(alias_bomb(), encoding="utf-8")
        print(f"bomb: {bomb.stat().st_size} bytes; campaign: {campaign.relative_to(REPO)} "
              f"({campaign.stat().st_size:,} bytes); {args.runs} runs each, one child per run\n")
        bombs, campaigns = [], []
        for _ in range(args.runs):  # interleaved, so load changes hit both alike
            bombs.append(measure(bomb))
            campaigns.append(measure(campaign))
        bomb_t, bomb_rss = summary("bomb (refused)", bombs)
        camp_t, _ = summary("campaign (loaded)", campaigns)
        print(f"\nratio bomb / campaign (median time): {bomb_t.median / camp_t.median:.2f}")
        ok = bomb_t.median < 0.5 and bomb_rss.median < 100 and all(
            r["outcome"].startswith("refused") for r in bombs)
        print(f"target (refused, < 0.5 s, < 100 MB): {'met' if ok else 'NOT met'}")
        if args.before:
            before(args.before, bomb, campaign, limit_mb=args.limit_mb,
                   timeout_s=args.timeout_s, tmp=Path(tmp))
    print(f"\nbench_yaml: {loadavg()}")


if __name__ == "__main__":
    main()
