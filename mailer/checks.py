"""Everything `mailer validate` checks about a campaign, as one function other commands reuse."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .audience import Recipient, columns, iter_audience
from .campaign import Campaign, load_campaign
from .config import Settings
from .render import (
    SAMPLE_LINKS,
    Rendition,
    check_merge_fields,
    personalise,
    render_campaign,
)


@dataclass(frozen=True)
class ListAudience:
    """The recipients of a campaign's list files, checked and counted once and read again from
    the files on each iteration: a million of them are never held in memory at once."""

    campaign: Campaign
    settings: Settings
    count: int

    def __iter__(self) -> Iterator[Recipient]:
        audience = self.campaign.audience
        return iter_audience(audience.lists, self.settings, languages=audience.languages)

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class Checked:
    campaign: Campaign
    rendition: Rendition
    recipients: ListAudience
    warnings: list[str]


def sample_recipient(campaign: Campaign, settings: Settings) -> Recipient:
    """A recipient with every column the campaign's lists share, for checking merge fields."""
    cols = columns(campaign.audience.lists, settings)
    return Recipient(
        email="erika.mustermann@example.org",
        name="Erika Mustermann",
        language=campaign.default_language,
        fields={c: f"<{c}>" for c in sorted(cols)},
    )


CLIP_BYTES = 100 * 1024  # Gmail shows "[Message clipped]" past ~102 KB of HTML


def size_warnings(rendition: Rendition, sample: Recipient) -> list[str]:
    """Mail programs cut off long HTML: say so per language before it goes out."""
    from .compose import b64, qp

    out = []
    for lr in rendition.languages.values():
        html = personalise(lr, sample, SAMPLE_LINKS).html
        size = len(qp(html) if lr.html_mostly_ascii else b64(html.encode("utf-8")))
        if size > CLIP_BYTES:
            out.append(f"{rendition.campaign.source}: the '{lr.lang}' mail has {size // 1024} KB "
                       "of HTML; Gmail cuts it off after about 100 KB (shorten the text or split "
                       "the newsletter)")
    return out


def check_campaign(path: Path, settings: Settings, *, with_audience: bool = True) -> Checked:
    """Load, render and merge-check one campaign; raises a UserError: every problem of the file
    itself at once (a CampaignProblems when there are several), else the first render problem."""
    warnings: list[str] = []
    campaign = load_campaign(path, settings, warnings=warnings)
    rendition = render_campaign(campaign, settings)
    sample = sample_recipient(campaign, settings)
    check_merge_fields(rendition, sample)
    warnings += size_warnings(rendition, sample)
    recipients = ListAudience(campaign, settings, 0)
    if with_audience:  # every row validated, as a stream
        recipients = ListAudience(campaign, settings, sum(1 for _ in recipients))
    return Checked(campaign, rendition, recipients, warnings)
