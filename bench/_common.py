"""Shared helpers for the benchmarks: timing statistics and a throw-away project folder."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LANGS = ("de", "tr", "ar")
BENCH_SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuvwxyz"

PARAGRAPH = (
    "Guten Tag {{ recipient.name }}, der Trägerkreis **IMAG** lädt Sie herzlich zum "
    "FORUM INTEGRATION ein. Wir sprechen über gute Nachbarschaft in der Nordstadt, über "
    "Sprachkurse, Ausbildung und Arbeit, über Moschee- und Kirchengemeinden und über das, was "
    "Dortmund zusammenhält. Mehr dazu auf [unserer Seite](https://imag.example.org/forum). "
    "Ihre Adresse bei uns: {{ recipient.email }}."
)


@dataclass
class Stats:
    """Median and spread of repeated measurements (seconds or rates)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        m = self.median
        return (max(self.values) - min(self.values)) / m if m else 0.0

    def fmt(self, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
        lo, hi = min(self.values) * scale, max(self.values) * scale
        return (f"{self.median * scale:,.{digits}f}{unit} (min {lo:,.{digits}f}, "
                f"max {hi:,.{digits}f}, n={len(self.values)}, spread {self.spread:.0%})")


def repeat(fn: Callable[[], object], reps: int) -> Stats:
    """Wall time of fn() over reps repetitions."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return Stats(out)


def rates(count: int, times: Stats) -> Stats:
    return Stats([count / t for t in times.values])


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


LIST_CHUNK = 30_000  # rows per list file: the mailer refuses list files over 2 MiB (yamlsrc.py)


def list_names(n: int) -> list[str]:
    chunks = max(1, -(-n // LIST_CHUNK))
    return ["big"] if chunks == 1 else [f"big{i}" for i in range(chunks)]


def campaign_yaml(campaign_id: str, *, blocks: int, langs: Iterable[str] = LANGS,
                  lists: Iterable[str] = ("big",)) -> str:
    """A newsletter campaign of `blocks` text blocks per language, no attachments."""
    lines = [f"id: {campaign_id}", "template: newsletter",
             f"audience: {{lists: [{', '.join(lists)}]}}", "content:"]
    for lang in langs:
        lines += [
            f"  {lang}:",
            f'    subject: "Benchmark {lang} für {{{{ recipient.name }}}}"',
            '    preheader: "Neues aus dem Trägerkreis IMAG"',
            "    blocks:",
            '      - heading: "Liebe Freundinnen und Freunde, {{ recipient.name }}"',
        ]
        for i in range(blocks):
            lines.append(f"      - text: \"Abschnitt {i + 1}. {PARAGRAPH}\"")
            if i % 5 == 4:
                lines.append("      - button: {label: \"Jetzt anmelden\", "
                             "url: \"https://imag.example.org/anmelden\"}")
    return "\n".join(lines) + "\n"


def write_list(path: Path, n: int, langs: Iterable[str] = LANGS, start: int = 0) -> None:
    langs = list(langs)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,name,language\n")
        for i in range(start, start + n):
            fh.write(f"user{i:07d}@example.org,Erika Mustermann {i},{langs[i % len(langs)]}\n")


def make_project(n: int, *, blocks: int = 6, campaign_id: str = "bench-40k",
                 root: Path | None = None) -> Path:
    """A temporary project folder: repo config + templates, big lists (n rows), one campaign."""
    folder = Path(tempfile.mkdtemp(prefix="imag-bench-", dir=root))
    shutil.copy(REPO / "config.yaml", folder / "config.yaml")
    shutil.copytree(REPO / "templates", folder / "templates")
    (folder / "lists").mkdir()
    (folder / "campaigns").mkdir()
    names = list_names(n)
    for i, name in enumerate(names):
        start = i * LIST_CHUNK
        write_list(folder / "lists" / f"{name}.csv", min(LIST_CHUNK, n - start), start=start)
    (folder / "campaigns" / f"{campaign_id}.yaml").write_text(
        campaign_yaml(campaign_id, blocks=blocks, lists=names), encoding="utf-8")
    return folder
