"""Issue 3 benchmark: `mailer send` against postfix smtp-sink, next to smtp-source.

    .venv/bin/python bench/bench_delivery.py [--quick] [--skip-postgres] [--skip-big]

Set-up: installs Debian's postfix (for /usr/sbin/smtp-sink and smtp-source) when missing, with
debconf preseeded to "No configuration", and stops the postfix daemon. One `smtp-sink` on
127.0.0.1 takes everything; it is killed at the end (also on errors and Ctrl-C).

  1. smtp-source -d -s S -m N -l 40000 for S in 1, 4, 16: messages/s (median of --reps).
  2. `mailer send` with MAILER_SMTP_POOL_SIZE=S, ~40 KB personalised messages, N recipients,
     a new SQLite ledger each time, its schema made by `mailer db upgrade` before the timing
     (`--fresh-db`: by the timed `mailer send` itself, ~0.4 s of alembic), the code
     byte-compiled before it, as an installed package is: messages/s over the whole process
     (start-up, validation, audience, ledger snapshot, sending, final counts) and over the
     send phase alone (from the "started run" line to the "run N: … sent" line).
     Ratio to smtp-source, target >= 0.5.
     Beside each rate: CPU per message of the sender (its whole process tree) and of smtp-sink,
     which shares the 2 cores: what the sink takes is not there for the sender.
  3. Peak RSS (/usr/bin/time -v, else VmHWM polled) of `mailer send` for 10,000 and 100,000
     recipients (target: flat, < 250 MB at 100,000), and the ledger cost: wall time of the
     100,000 run on SQLite and on PostgreSQL (a fresh database on 127.0.0.1:5432, dropped after).
Every subprocess has a timeout; only loopback is used.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_SECRET, REPO, Stats, loadavg, make_project  # noqa: E402

SINK = "/usr/sbin/smtp-sink"
SOURCE = "/usr/sbin/smtp-source"
GNU_TIME = "/usr/bin/time"
# `python -m mailer`, not the installed script: the script names this tree's entry point,
# which an older tree (--before) may not have.
MAILER = [str(REPO / ".venv" / "bin" / "python"), "-m", "mailer"]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
MSG_SIZE = 40_000


# --- set-up ---------------------------------------------------------------------------------


def ensure_tools() -> None:
    if not (Path(SINK).exists() and Path(SOURCE).exists()):
        print("installing postfix for smtp-sink/smtp-source …", flush=True)
        subprocess.run(["debconf-set-selections"], check=True, timeout=60, text=True,
                       input="postfix postfix/main_mailer_type select No configuration\n")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "postfix"], check=True, timeout=600, env=env,
                       stdout=subprocess.DEVNULL)
    if not Path(GNU_TIME).exists():
        with contextlib.suppress(Exception):
            subprocess.run(["apt-get", "install", "-y", "time"], timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The daemon must not be left running (the tools do not need it).
    for cmd in (["postfix", "stop"], ["service", "postfix", "stop"]):
        with contextlib.suppress(Exception):
            subprocess.run(cmd, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def smtp_sink(workdir: Path) -> Iterator[tuple[int, Path, int]]:
    port = free_port()
    log = workdir / "sink.out"
    cmd = [SINK]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
    cmd += ["-c", f"127.0.0.1:{port}", "1000"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        print(f"smtp-sink pid {proc.pid} on 127.0.0.1:{port}", flush=True)
        yield port, log, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def sink_messages(log: Path) -> int:
    """The last `mesg=` counter smtp-sink -c printed."""
    with log.open("rb") as fh:
        fh.seek(max(0, log.stat().st_size - 4096))
        found = re.findall(rb"mesg=(\d+)", fh.read())
    return int(found[-1]) if found else 0


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of every finished child process and their waited-for descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuShare:
    """CPU milliseconds per message: the sender's process tree and smtp-sink's."""

    sender: list[float]
    sink: list[float]

    def fmt(self) -> str:
        return (f"CPU per message: sender {statistics.median(self.sender):.3f} ms, "
                f"smtp-sink {statistics.median(self.sink):.3f} ms")


# --- smtp-source ----------------------------------------------------------------------------


def smtp_source(port: int, sessions: int, n: int, reps: int,
                sink_pid: int) -> tuple[Stats, CpuShare]:
    rates = []
    cpu = CpuShare([], [])
    for _ in range(reps):
        own, sink = children_cpu_s(), process_cpu_s(sink_pid)
        t0 = time.perf_counter()
        subprocess.run([SOURCE, "-d", "-s", str(sessions), "-m", str(n), "-l", str(MSG_SIZE),
                        f"127.0.0.1:{port}"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        rates.append(n / (time.perf_counter() - t0))
        cpu.sender.append((children_cpu_s() - own) * 1000 / n)
        cpu.sink.append((process_cpu_s(sink_pid) - sink) * 1000 / n)
    return Stats(rates), cpu


# --- mailer send ----------------------------------------------------------------------------


@dataclass
class SendRun:
    wall_s: float
    send_s: float
    sent: int
    rss_mb: float
    output: str


def mailer_send(project: Path, *, port: int, pool: int, db_url: str, timeout: float,
                workers: str = "auto", code: Path | None = None) -> SendRun:
    """One `mailer send`; `code`: a source tree to run instead of this one (PYTHONPATH)."""
    env = mailer_env(project, db_url=db_url, code=code, MAILER_DISPATCH_WORKERS=workers,
                     MAILER_ALLOW_LOCAL_LINKS="1", MAILER_SMTP_HOST="127.0.0.1",
                     MAILER_SMTP_PORT=str(port), MAILER_SMTP_POOL_SIZE=str(pool),
                     MAILER_SMTP_RATE_PER_SECOND="1000000", PYTHONUNBUFFERED="1")
    cmd = [*MAILER, "--config", str(project / "config.yaml"), "send", "bench-40k"]
    use_time = Path(GNU_TIME).exists()
    if use_time:
        cmd = [GNU_TIME, "-v", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stamps: dict[str, float] = {}
    lines: list[str] = []
    errs: list[str] = []
    hwm = [0]

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            now = time.perf_counter()
            if "started run" in line or "resuming run" in line:
                stamps["start"] = now
            elif re.match(r"run \d+ of \S+: \d+ sent", line):
                stamps["end"] = now

    def read_err() -> None:
        assert proc.stderr is not None
        errs.extend(proc.stderr)

    def poll_rss() -> None:  # fallback when GNU time is missing
        while proc.poll() is None:
            with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]))
            time.sleep(0.2)

    threads = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
    if not use_time:
        threads.append(threading.Thread(target=poll_rss, daemon=True))
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mailer send timed out after {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=5)
    err = "".join(errs)
    out = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"mailer send exited {proc.returncode}:\n{out}\n{err[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss_kb = int(m.group(1)) if m else hwm[0]
    sent = re.search(r"run \d+ of \S+: (\d+) sent", out)
    return SendRun(wall_s=wall, send_s=stamps.get("end", wall) - stamps.get("start", 0.0),
                   sent=int(sent.group(1)) if sent else 0, rss_mb=rss_kb / 1024, output=out)


def upgrade(project: Path, *, db_url: str, code: Path | None = None) -> None:
    """`mailer db upgrade` on a new ledger, outside the timing."""
    subprocess.run([*MAILER, "--config", str(project / "config.yaml"), "db", "upgrade"],
                   env=mailer_env(project, db_url=db_url, code=code), cwd=project, check=True,
                   capture_output=True, timeout=120)


def mailer_env(project: Path, *, db_url: str, code: Path | None, **more: str) -> dict[str, str]:
    """The environment of a `mailer` command of this benchmark (`code`: see mailer_send)."""
    extra = {"PYTHONPATH": str(code)} if code is not None else {}
    return {**os.environ, **extra, "MAILER_DATABASE_URL": db_url,
            "MAILER_SECRET_KEY": BENCH_SECRET, "MAILER_CONFIG": str(project / "config.yaml"),
            **more}


@contextlib.contextmanager
def postgres_db() -> Iterator[str]:
    import psycopg

    name = f"imag_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the benchmark --------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--n", type=int, default=5_000, help="messages per rate measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sessions", default="1,4,16")
    ap.add_argument("--big", default="10000,100000", help="recipient counts for RSS/ledger")
    ap.add_argument("--skip-big", action="store_true", help="no RSS / ledger runs")
    ap.add_argument("--skip-rates", action="store_true", help="only the RSS / ledger runs")
    ap.add_argument("--skip-postgres", action="store_true")
    ap.add_argument("--big-pool", type=int, default=4, help="pool size of the RSS/ledger runs")
    ap.add_argument("--workers", default="1,auto",
                    help="MAILER_DISPATCH_WORKERS values to compare (the default: one process, "
                         "and one per core)")
    ap.add_argument("--fresh-db", action="store_true",
                    help="time the schema's creation too: each `mailer send` migrates an empty "
                         "database (by default `mailer db upgrade` runs first, untimed, as a "
                         "deployment migrates once)")
    ap.add_argument("--before", metavar="REV",
                    help="also run the mailer as it was at git revision REV, interleaved with "
                         "this tree, for a before/after ratio in the same run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.reps, args.big = 500, 2, "1000,5000"
    sessions = [int(s) for s in args.sessions.split(",")]
    big = [int(s) for s in args.big.split(",")]

    ensure_tools()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"imag-bench-delivery-{os.getpid()}"
    work.mkdir(parents=True)
    print(f"# bench_delivery  ({loadavg()} at start)  work dir {work}; the rate runs' "
          f"ledgers are {'empty files' if args.fresh_db else 'migrated before the timing'}",
          flush=True)
    projects: dict[int, Path] = {}

    def project(n: int) -> Path:
        if n not in projects:
            projects[n] = make_project(n, root=work)
        return projects[n]

    def db(tag: str) -> str:
        return f"sqlite:///{work}/{tag}-{secrets.token_hex(3)}.db"

    variants: list[tuple[str, Path | None]] = [("now", None)]
    if args.before:
        tree = work / "before"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "mailer"], check=True,
                                 capture_output=True, timeout=60, cwd=REPO).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True, timeout=60)
        variants.append((args.before[:10], tree))
    # Byte-compiled as an installed package is (pip compiles at install; an editable install
    # on first import): where PYTHONDONTWRITEBYTECODE is set, as on this workplace's machines,
    # every timed command would otherwise compile our ~40 modules from source (~60 ms).
    for _, code in variants:
        compileall.compile_dir(str((code or REPO) / "mailer"), quiet=1)
    try:
        with smtp_sink(work) as (port, sink_log, sink_pid):
            # 1 + 2: rates per session count, interleaved so noise hits both alike.
            rows = []
            for s in [] if args.skip_rates else sessions:
                src, src_cpu = smtp_source(port, s, args.n, args.reps, sink_pid)
                print(f"sessions {s:2}: smtp-source {src.fmt(' msg/s', digits=0)}; "
                      f"{src_cpu.fmt()}", flush=True)
                for workers in args.workers.split(","):
                    walls: dict[str, list[float]] = {name: [] for name, _ in variants}
                    sends: dict[str, list[float]] = {name: [] for name, _ in variants}
                    cpus = {name: CpuShare([], []) for name, _ in variants}
                    for _ in range(args.reps):
                        for name, code in variants:  # interleaved: noise hits both alike
                            url = db(f"s{s}")
                            if not args.fresh_db:
                                upgrade(project(args.n), db_url=url, code=code)
                            before = sink_messages(sink_log)
                            own, sink = children_cpu_s(), process_cpu_s(sink_pid)
                            r = mailer_send(project(args.n), port=port, pool=s,
                                            db_url=url, timeout=max(120, args.n / 20),
                                            workers=workers, code=code)
                            cpus[name].sender.append((children_cpu_s() - own) * 1000 / args.n)
                            time.sleep(0.3)
                            cpus[name].sink.append(
                                (process_cpu_s(sink_pid) - sink) * 1000 / args.n)
                            got = sink_messages(sink_log) - before
                            if r.sent != args.n or got < args.n:
                                print(f"  WARNING: mailer reported {r.sent} sent, sink counted "
                                      f"{got}")
                            walls[name].append(args.n / r.wall_s)
                            sends[name].append(args.n / r.send_s)
                    for name, _ in variants:
                        w, sd = Stats(walls[name]), Stats(sends[name])
                        rows.append((s, workers, name, src, w, sd))
                        print(f"  workers {workers:>4} {name:>10}: whole process "
                              f"{w.fmt(' msg/s', digits=0)}")
                        print(f"                            send phase    "
                              f"{sd.fmt(' msg/s', digits=0)}")
                        print(f"                            RATIO whole/source "
                              f"{w.median / src.median:.3f}, send phase/source "
                              f"{sd.median / src.median:.3f}  (target >= 0.5)")
                        print(f"                            {cpus[name].fmt()}", flush=True)
            print(f"\n{'sessions':>8} {'workers':>7} {'code':>10} {'smtp-source/s':>14} "
                  f"{'mailer/s':>9} {'send phase/s':>13} {'ratio':>6} {'ratio(send)':>11}")
            for s, workers, name, src, w, sd in rows:
                print(f"{s:8} {workers:>7} {name:>10} {src.median:14,.0f} {w.median:9,.0f} "
                      f"{sd.median:13,.0f} {w.median / src.median:6.3f} "
                      f"{sd.median / src.median:11.3f}")
            if len(variants) > 1:
                now = {(s, wk): w.median for s, wk, name, _, w, _ in rows if name == "now"}
                for s, wk, name, _, w, _ in rows:
                    if name != "now":
                        print(f"RATIO now / {name} at {s} sessions, workers {wk}: "
                              f"{now[(s, wk)] / w.median:.2f}x (whole process)")
            print(f"# {loadavg()}", flush=True)

            # 3: peak RSS and ledger cost.
            if not args.skip_big:
                print(f"\n## peak RSS and ledger cost (pool {args.big_pool}, ~40 KB messages)")
                timeout = 3600.0
                for n in big:
                    r = mailer_send(project(n), port=port, pool=args.big_pool,
                                    db_url=db(f"big{n}"), timeout=timeout)
                    print(f"{n:>7,} recipients, SQLite:     peak RSS {r.rss_mb:6.1f} MB, wall "
                          f"{r.wall_s:6.1f} s ({n / r.wall_s:,.0f} msg/s), send phase "
                          f"{r.send_s:6.1f} s, setup {r.wall_s - r.send_s:5.1f} s, sent {r.sent:,}",
                          flush=True)
                if not args.skip_postgres:
                    n = max(big)
                    try:
                        with postgres_db() as url:
                            r = mailer_send(project(n), port=port, pool=args.big_pool,
                                            db_url=url, timeout=timeout)
                        print(f"{n:>7,} recipients, PostgreSQL: peak RSS {r.rss_mb:6.1f} MB, "
                              f"wall {r.wall_s:6.1f} s ({n / r.wall_s:,.0f} msg/s), send phase "
                              f"{r.send_s:6.1f} s, setup {r.wall_s - r.send_s:5.1f} s, "
                              f"sent {r.sent:,}", flush=True)
                    except Exception as exc:  # PostgreSQL unreachable: say so, keep the rest
                        print(f"PostgreSQL run skipped: {exc}")
            print(f"# {loadavg()} at end; smtp-sink counted {sink_messages(sink_log):,} messages")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
