"""Issue 3 benchmark: compose rate of ~40 KB personalised messages vs stdlib EmailMessage.

    .venv/bin/python bench/bench_compose.py [--quick] [--profile]

A temporary project (repo config + templates, a synthetic newsletter campaign in de/tr/ar whose
messages are ~40 KB, a list of --recipients addresses spread over the three languages).

  * mailer: `Composer.compose(recipient)` → `.data` (token, merge fields, headers, MIME bytes);
  * baseline, same run: per recipient the same token and `personalise()`, then the same message
    built with the stdlib: `EmailMessage(policy=SMTP)`, the same headers, `set_content(text,
    cte='quoted-printable')`, `add_alternative(html, subtype='html', cte='quoted-printable')`,
    `as_bytes()`; measured on --sample recipients and extrapolated. Also reported: the stdlib
    MIME step alone (body already personalised) against the mailer's whole compose.
Target (issue 3): compose / stdlib >= 10.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_SECRET, Stats, loadavg, make_project, rates, repeat  # noqa: E402

from mailer.audience import Recipient  # noqa: E402
from mailer.checks import check_campaign  # noqa: E402
from mailer.compose import Composer, encoded_part, qp  # noqa: E402
from mailer.config import Settings, load_settings  # noqa: E402
from mailer.render import Links, Personalised, personalise, personalise_pieces  # noqa: E402
from mailer.tokens import Tokens  # noqa: E402


def stdlib_message(settings: Settings, r: Recipient, body: Personalised, links: Links,
                   mid: str) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((settings.sender.name, settings.sender.address))
    if settings.sender.reply_to:
        msg["Reply-To"] = settings.sender.reply_to
    msg["To"] = formataddr((r.name, r.email))
    msg["Subject"] = body.subject
    msg["Date"] = format_datetime(datetime.now(settings.tz))
    msg["Message-ID"] = mid
    msg["List-Id"] = settings.list_id
    token = links.unsubscribe.rsplit("/", 1)[1]
    msg["List-Unsubscribe"] = (f"<{links.unsubscribe}>, <mailto:{settings.unsubscribe_mailto}"
                               f"?subject=unsubscribe%20{token}>")
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Content-Language"] = body.lang
    msg.set_content(body.text, cte="quoted-printable")
    msg.add_alternative(body.html, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--recipients", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=300, help="recipients for the stdlib baseline")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=6, help="text blocks per language (6 ≈ 40 KB)")
    ap.add_argument("--profile", action="store_true", help="cProfile Composer.compose")
    args = ap.parse_args()
    if args.quick:
        args.recipients, args.sample, args.reps = 1_000, 60, 3

    folder = make_project(args.recipients, blocks=args.blocks)
    try:
        settings = load_settings(folder / "config.yaml", {"MAILER_SECRET_KEY": BENCH_SECRET})
        checked = check_campaign(folder / "campaigns" / "bench-40k.yaml", settings)
        people = list(checked.recipients)  # read from the list files before they go
    finally:
        shutil.rmtree(folder)
    n = len(people)
    composer = Composer(checked.rendition, settings, tokens=Tokens("bench-secret"))
    rendition = checked.rendition
    print(f"# bench_compose  ({loadavg()} at start)")
    sizes = [len(composer.compose(r, message_id="<x@y>").data) for r in people[:300]]
    print(f"{n:,} recipients, languages {', '.join(rendition.languages)}, message "
          f"{sum(sizes) / len(sizes) / 1024:.1f} KiB on average "
          f"({min(sizes):,}–{max(sizes):,} bytes)")

    def compose_all() -> None:
        for i, r in enumerate(people):
            composer.compose(r, message_id=f"<{i}.bench@imag.example.org>")

    sample = people[: args.sample]
    bodies = []
    for r in sample:
        lk = composer.links(r)
        bodies.append((r, personalise(rendition.for_language(r.language), r, lk), lk))

    def stdlib_all() -> None:
        for i, r in enumerate(sample):
            lk = composer.links(r)
            body = personalise(rendition.for_language(r.language), r, lk)
            stdlib_message(settings, r, body, lk, f"<{i}.bench@imag.example.org>")

    def stdlib_mime_only() -> None:
        for i, (r, body, lk) in enumerate(bodies):
            stdlib_message(settings, r, body, lk, f"<{i}.bench@imag.example.org>")

    std_size = sum(len(stdlib_message(settings, r, b, lk, "<x@y>")) for r, b, lk in bodies)
    print(f"stdlib message {std_size / len(bodies) / 1024:.1f} KiB on average")

    # Interleave the measurements so machine noise hits both sides alike.
    comp_t, std_t, mime_t = [], [], []
    for _ in range(args.reps):
        comp_t += repeat(compose_all, 1).values
        std_t += repeat(stdlib_all, 1).values
        mime_t += repeat(stdlib_mime_only, 1).values
    comp = rates(n, Stats(comp_t))
    std = rates(len(sample), Stats(std_t))
    mime = rates(len(sample), Stats(mime_t))
    print(f"Composer.compose:                        {comp.fmt(' msg/s', digits=0)}  "
          f"({1e3 / comp.median:.3f} ms each)")
    print(f"stdlib (token + personalise + MIME):     {std.fmt(' msg/s', digits=0)}  "
          f"({1e3 / std.median:.3f} ms each, sample {len(sample)})")
    print(f"stdlib MIME step only:                   {mime.fmt(' msg/s', digits=0)}  "
          f"({1e3 / mime.median:.3f} ms each)")
    ratio = comp.median / std.median
    print(f"RATIO compose / stdlib = {ratio:.2f}x  (target >= 10: "
          f"{'met' if ratio >= 10 else 'MISSED'});  compose / stdlib MIME only = "
          f"{comp.median / mime.median:.1f}x")

    # Where the compose time goes, without profiler overhead: the public steps timed alone.
    lrs = [rendition.for_language(r.language) for r in people]
    lks = [composer.links(r) for r in people]
    tok = repeat(lambda: [composer.links(r) for r in people], args.reps).median / n
    # personalise_pieces, what compose calls (personalise() also joins the pieces: timing it
    # here made the rest come out negative once the pieces got cheap)
    pers = repeat(lambda: [personalise_pieces(lr, r, lk)
                           for lr, r, lk in zip(lrs, people, lks, strict=True)],
                  args.reps).median / n
    total = 1 / comp.median
    rest = total - tok - pers
    print(f"breakdown per message: token {tok * 1e3:.3f} ms ({tok / total:.0%}), personalise "
          f"{pers * 1e3:.3f} ms ({pers / total:.0%}), headers + MIME encoding "
          f"{rest * 1e3:.3f} ms ({rest / total:.0%})")
    pieces_all = [personalise_pieces(lr, r, lk) for lr, r, lk in zip(lrs, people, lks,
                                                                      strict=True)]

    def encode_bodies(encode_qp: Callable[[Sequence[str]], bytes]) -> Callable[[], None]:
        def run() -> None:
            for b, lr in zip(pieces_all, lrs, strict=True):
                encoded_part(b.text, lr.text_mostly_ascii, encode_qp)
                encoded_part(b.html, lr.html_mostly_ascii, encode_qp)
        return run

    spliced_t, whole_t = [], []
    for _ in range(args.reps):  # interleaved, like the rates above
        spliced_t += repeat(encode_bodies(composer._qp), 1).values
        whole_t += repeat(encode_bodies(lambda pieces: qp("".join(pieces))), 1).values
    spliced, whole = Stats(spliced_t).median / n, Stats(whole_t).median / n
    print(f"  of which the transfer encoding of the two bodies (template text spliced in, merge "
          f"values encoded): {spliced * 1e3:.3f} ms ({spliced / total:.0%}); headers, joins and "
          f"copies the remaining {(rest - spliced) * 1e3:.3f} ms ({(rest - spliced) / total:.0%})")
    print(f"  the same bodies encoded whole (qp of the joined text, as before): "
          f"{whole * 1e3:.3f} ms;  RATIO whole / spliced = {whole / spliced:.1f}x")
    print(f"# {loadavg()} at end")

    if args.profile or ratio < 10:
        prof = cProfile.Profile()
        prof.enable()
        for i, r in enumerate(people[:3000]):
            composer.compose(r, message_id=f"<{i}.bench@imag.example.org>")
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        print("\n# cProfile of Composer.compose (3,000 messages), by own time "
              "(profiler overhead inflates per-character Python loops)")
        print("\n".join(out.getvalue().splitlines()[:40]))


if __name__ == "__main__":
    main()
