"""Everything `mailer validate` checks about a campaign, as one function other commands reuse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .audience import Recipient, columns, resolve
from .campaign import Campaign, load_campaign
from .config import Settings
from .render import Rendition, check_merge_fields, render_campaign


@dataclass(frozen=True)
class Checked:
    campaign: Campaign
    rendition: Rendition
    recipients: list[Recipient]
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


def check_campaign(path: Path, settings: Settings, *, with_audience: bool = True) -> Checked:
    """Load, render and merge-check one campaign; raises a UserError at the first problem."""
    warnings: list[str] = []
    campaign = load_campaign(path, settings, warnings=warnings)
    rendition = render_campaign(campaign, settings)
    check_merge_fields(rendition, sample_recipient(campaign, settings))
    recipients = (
        resolve(campaign.audience.lists, settings, languages=campaign.audience.languages)
        if with_audience else []
    )
    return Checked(campaign, rendition, recipients, warnings)
