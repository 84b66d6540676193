"""Issue 2 benchmark: compile time per campaign × language, per-recipient personalisation rate.

    .venv/bin/python bench/bench_render.py [--quick]

For every shipped campaign in campaigns/:
  * compile: `_render_language` (Jinja layout → MJML → HTML + text part + stage-2 templates),
    median of --compiles runs per language, and `render_campaign` for the whole campaign;
  * per recipient, over a list of --recipients synthetic recipients spread evenly over the
    campaign's languages:
      - `personalise()` with the links precomputed (merge fields only),
      - token + `personalise()` (what the send path does per recipient before MIME),
      - `Composer.compose()` (the whole message bytes);
  * baseline, measured in the same run on a sample and extrapolated:
      - A: "Jinja2 on the whole layout + MJML compile per recipient" (`_render_layout` +
        `mjml2html` with the campaign's real context; the cheapest possible naive pipeline:
        no text part, no merge-field substitution),
      - B: the whole stage 1 per recipient (`_render_language` for the recipient's language,
        then `personalise`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_SECRET, REPO, loadavg, rates, repeat  # noqa: E402
from mjml import mjml2html  # noqa: E402

import mailer.render as render  # noqa: E402
from mailer.audience import Recipient  # noqa: E402
from mailer.checks import check_campaign  # noqa: E402
from mailer.compose import Composer  # noqa: E402
from mailer.config import Settings, load_settings  # noqa: E402
from mailer.tokens import Tokens  # noqa: E402


def recipients_for(base: list[Recipient], langs: list[str], n: int) -> list[Recipient]:
    """n distinct recipients, cycling the campaign's real list rows, languages evenly spread."""
    out = []
    for i in range(n):
        r = base[i % len(base)]
        out.append(dataclasses.replace(r, email=f"bench{i:07d}@example.org",
                                       language=langs[i % len(langs)]))
    return out


def capture_contexts(campaign: Any, settings: Settings) -> dict[str, dict[str, Any]]:
    """The stage-1 Jinja context per language, as `render_campaign` builds it."""
    contexts: dict[str, dict[str, Any]] = {}
    original = render._render_layout

    def spy(c: Any, s: Settings, context: dict[str, Any]) -> str:
        contexts[context["lang"]] = context
        return original(c, s, context)

    render._render_layout = spy
    try:
        render.render_campaign(campaign, settings)
    finally:
        render._render_layout = original
    return contexts


def bench_campaign(path: Path, settings: Settings, args: argparse.Namespace) -> dict[str, float]:
    checked = check_campaign(path, settings)
    campaign, rendition = checked.campaign, checked.rendition
    langs = list(campaign.languages)
    print(f"\n## {campaign.id}  (template {campaign.template}, languages {', '.join(langs)}, "
          f"{len(rendition.attachments)} attachment(s))")

    # -- compile time per language ----------------------------------------------------------
    for lang in langs:
        t = repeat(lambda lang=lang: render._render_language(campaign, settings, lang),
                   args.compiles)
        print(f"  compile {lang}: {t.fmt(' ms', 1e3, 2)}")
    t = repeat(lambda: render.render_campaign(campaign, settings), args.compiles)
    print(f"  render_campaign (all {len(langs)} languages + attachments): {t.fmt(' ms', 1e3, 2)}")

    # -- per recipient ----------------------------------------------------------------------
    n = args.recipients
    people = recipients_for(list(checked.recipients), langs, n)
    composer = Composer(rendition, settings, tokens=Tokens("bench-secret"))
    links = [composer.links(r) for r in people]
    lrs = [rendition.for_language(r.language) for r in people]
    pairs = list(zip(lrs, people, links, strict=True))

    def merge_only() -> None:
        for lr, r, lk in pairs:
            render.personalise(lr, r, lk)

    def token_and_merge() -> None:
        for lr, r in zip(lrs, people, strict=True):
            render.personalise(lr, r, composer.links(r))

    def compose() -> None:
        for i, r in enumerate(people):
            composer.compose(r, message_id=f"<{i}.bench@imag.example.org>")

    size = sum(len(composer.compose(r, message_id="<x@y>").data) for r in people[:300])
    size /= min(300, n)
    merge = rates(n, repeat(merge_only, args.reps))
    tok = rates(n, repeat(token_and_merge, args.reps))
    comp = rates(n, repeat(compose, args.reps))
    print(f"  {n:,} recipients, message ~{size / 1024:.1f} KiB")
    print(f"  personalise (merge only):   {merge.fmt(' msg/s', digits=0)}")
    print(f"  token + personalise:        {tok.fmt(' msg/s', digits=0)}")
    print(f"  Composer.compose (bytes):   {comp.fmt(' msg/s', digits=0)}")

    # -- baselines --------------------------------------------------------------------------
    contexts = capture_contexts(campaign, settings)
    sample = people[: args.sample]

    def naive_layout() -> None:
        for r in sample:
            ctx = contexts[rendition.for_language(r.language).lang]
            mjml2html(render._render_layout(campaign, settings, ctx), disable_comments=True)

    def naive_stage1() -> None:
        for r, lk in zip(sample, links, strict=False):
            lr = render._render_language(campaign, settings,
                                         rendition.for_language(r.language).lang)
            render.personalise(lr, r, lk)

    base_a = rates(len(sample), repeat(naive_layout, args.reps))
    base_b = rates(len(sample), repeat(naive_stage1, args.reps))
    print(f"  baseline A, Jinja layout + MJML per recipient (sample {len(sample)}): "
          f"{base_a.fmt(' msg/s', digits=0)}")
    print(f"  baseline B, whole stage 1 + personalise per recipient (sample {len(sample)}): "
          f"{base_b.fmt(' msg/s', digits=0)}")
    print(f"  {n:,} recipients: personalise {n / merge.median:.2f} s, compose "
          f"{n / comp.median:.2f} s, baseline A {n / base_a.median:.1f} s (extrapolated), "
          f"baseline B {n / base_b.median:.1f} s (extrapolated)")
    r_merge = merge.median / base_a.median
    r_comp = comp.median / base_a.median
    print(f"  RATIO personalise / baseline A = {r_merge:.1f}x;  token+personalise / A = "
          f"{tok.median / base_a.median:.1f}x;  compose / A = {r_comp:.1f}x;  "
          f"personalise / baseline B = {merge.median / base_b.median:.1f}x")
    return {"merge": merge.median, "compose": comp.median, "base_a": base_a.median,
            "base_b": base_b.median}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (1,000 recipients)")
    ap.add_argument("--recipients", type=int, default=10_000)
    ap.add_argument("--compiles", type=int, default=20)
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--campaign", action="append", help="only these campaign files")
    args = ap.parse_args()
    if args.quick:
        args.recipients, args.compiles, args.sample, args.reps = 1_000, 5, 50, 3

    settings = load_settings(REPO / "config.yaml", {"MAILER_SECRET_KEY": BENCH_SECRET})
    paths = [Path(p) for p in args.campaign] if args.campaign else sorted(
        (REPO / "campaigns").glob("*.yaml"))
    print(f"# bench_render  ({loadavg()} at start)")
    t0 = time.perf_counter()
    results = {p.stem: bench_campaign(p, settings, args) for p in paths}
    print(f"\n# summary ({loadavg()} at end, {time.perf_counter() - t0:.0f} s)")
    print(f"{'campaign':40} {'personalise/s':>14} {'compose/s':>10} {'baseline A/s':>13} "
          f"{'ratio':>7} {'baseline B/s':>13} {'ratio':>7}")
    for name, r in results.items():
        print(f"{name:40} {r['merge']:14,.0f} {r['compose']:10,.0f} {r['base_a']:13,.0f} "
              f"{r['merge'] / r['base_a']:6.1f}x {r['base_b']:13,.0f} "
              f"{r['merge'] / r['base_b']:6.1f}x")


if __name__ == "__main__":
    main()
