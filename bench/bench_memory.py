"""Issue 13 benchmark: peak memory of the three commands that read a whole audience.

    .venv/bin/python bench/bench_memory.py [--rows 1000000] [--quick] [--only validate,send,dry-run]

Writes a temporary project (the repository's config.yaml, templates/ and lists/, as the tests'
`project` fixture does; SQLite under its var/; the embedded capture server) with one CSV list of
`--rows` rows (example.org addresses, names, languages de/tr/ar, one extra merge-field column
`stadtteil`) and a campaign in de/tr/ar that uses every column, then runs as subprocesses:

  * validate:  mailer validate CAMPAIGN
  * send:      mailer send CAMPAIGN --limit 1000   (snapshot of every row, 1,000 mails sent)
  * dry-run:   mailer send CAMPAIGN --dry-run      (every recipient's message composed)

and prints each one's peak RSS (ru_maxrss of the child from wait4, in MB), wall time, CPU time
(user + system: the machine is shared, so wall time alone says little), and the ratio to the
goal of 150 MB at 1,000,000 recipients. `--quick` uses 100,000 rows. The
temporary project is removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_SECRET, LANGS, REPO, loadavg  # noqa: E402

MAILER = str(Path(sys.executable).with_name("mailer"))
GOAL_MB = 150.0
CAMPAIGN_ID = "bench-memory"
LIST_NAME = "members"
STADTTEILE = ("Nordstadt", "Hörde", "Eving", "Scharnhorst", "Huckarde", "Innenstadt-West")
CAMPAIGN = """\
id: {id}
template: newsletter
audience: {{lists: [{list}]}}
content:
{content}"""
CONTENT = """\
  {lang}:
    subject: "FORUM INTEGRATION {lang} für {{{{ recipient.name }}}}"
    preheader: "Neues aus {{{{ recipient.stadtteil }}}}"
    blocks:
      - heading: "Liebe {{{{ recipient.name }}}}"
      - text: "Der Trägerkreis **IMAG** lädt Sie in {{{{ recipient.stadtteil }}}} ein."
"""
COMMANDS = {
    "validate": ["validate", CAMPAIGN_ID],
    "send": ["send", CAMPAIGN_ID, "--limit", "1000"],
    "dry-run": ["send", CAMPAIGN_ID, "--dry-run"],
}


@dataclass
class Measured:
    name: str
    rss_mb: float
    wall_s: float
    cpu_s: float
    last_line: str


def write_list(path: Path, rows: int) -> None:
    """`rows` distinct recipients with an extra column, written as a stream."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("email,name,language,stadtteil\n")
        for i in range(rows):
            fh.write(f"user{i:07d}@example.org,Erika Mustermann {i},{LANGS[i % 3]},"
                     f"{STADTTEILE[i % len(STADTTEILE)]}\n")


def make_project(rows: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="imag-bench-memory-"))
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    shutil.copytree(REPO / "templates", root / "templates")
    shutil.copytree(REPO / "lists", root / "lists")
    (root / "campaigns").mkdir()
    write_list(root / "lists" / f"{LIST_NAME}.csv", rows)
    content = "".join(CONTENT.format(lang=lang) for lang in LANGS)
    (root / "campaigns" / f"{CAMPAIGN_ID}.yaml").write_text(
        CAMPAIGN.format(id=CAMPAIGN_ID, list=LIST_NAME, content=content), encoding="utf-8")
    return root


def run(name: str, root: Path, args: list[str]) -> Measured:
    """One command as a child process; its peak RSS from wait4 (Linux: KiB)."""
    env = {**os.environ, "MAILER_CONFIG": str(root / "config.yaml"),
           "MAILER_SECRET_KEY": BENCH_SECRET, "PYTHONUNBUFFERED": "1"}
    for key in [k for k in env if k.startswith("MAILER_SMTP_") or k == "MAILER_DATABASE_URL"]:
        del env[key]  # the project's own: SQLite under var/, the embedded capture server
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([MAILER, *args], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise SystemExit(f"{name}: mailer {' '.join(args)} exited {proc.returncode}:\n"
                         f"{text[-3000:]}")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("warning:")]
    return Measured(name, usage.ru_maxrss / 1024, wall, usage.ru_utime + usage.ru_stime,
                    lines[-1] if lines else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the list")
    ap.add_argument("--quick", action="store_true", help="100,000 rows")
    ap.add_argument("--only", default=",".join(COMMANDS),
                    help=f"comma-separated subset of {', '.join(COMMANDS)}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = ap.parse_args()
    rows = 100_000 if args.quick else args.rows
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        ap.error(f"unknown command {', '.join(unknown)} (choose from {', '.join(COMMANDS)})")
    print(f"# bench_memory  ({loadavg()} at start)", flush=True)
    t0 = time.perf_counter()
    root = make_project(rows)
    size = (root / "lists" / f"{LIST_NAME}.csv").stat().st_size
    print(f"{rows:,} rows, {size / 2**20:.1f} MiB list written in "
          f"{time.perf_counter() - t0:.1f} s  ({root})", flush=True)
    results = []
    try:
        for name in names:
            m = run(name, root, COMMANDS[name])
            results.append(m)
            print(f"{name:>8}: peak RSS {m.rss_mb:7.1f} MB, wall {m.wall_s:7.1f} s, CPU "
                  f"{m.cpu_s:7.1f} s, {m.rss_mb / GOAL_MB:.2f} of the {GOAL_MB:.0f} MB goal  | "
                  f"{m.last_line}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'command':>8} {'rows':>10} {'peak RSS MB':>12} {'wall s':>8} {'CPU s':>8} "
          f"{'RSS/goal':>9}")
    for m in results:
        print(f"{m.name:>8} {rows:>10,} {m.rss_mb:12.1f} {m.wall_s:8.1f} {m.cpu_s:8.1f} "
              f"{m.rss_mb / GOAL_MB:9.2f}")
    print(f"# {loadavg()} at end")
    if any(m.rss_mb > GOAL_MB for m in results):
        print(f"over the {GOAL_MB:.0f} MB goal: "
              + ", ".join(m.name for m in results if m.rss_mb > GOAL_MB))


if __name__ == "__main__":
    main()
