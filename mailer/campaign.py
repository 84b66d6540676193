"""The campaign model and its YAML loading, with errors that name file, line and field."""

from __future__ import annotations

import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from babel import Locale, UnknownLocaleError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .config import Settings
from .errors import CampaignError
from .yamlsrc import Located, closest, load_yaml, validation_problems

ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
MAX_ATTACHMENTS_BYTES = 10 * 1024 * 1024
TIME_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")
RTL_LANGUAGES = frozenset({"ar", "fa", "he", "ur", "ps", "ku", "yi", "dv"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_line(value: str, what: str = "this field") -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must be one line: remove the line break")
    if any(ord(c) < 32 and c != "\t" for c in value):
        raise ValueError(f"{what} contains a control character: remove it")
    return value


def _url(value: str) -> str:
    value = _one_line(value.strip(), "a link")
    if not value.startswith(("https://", "http://", "mailto:", "tel:", "{{")):
        raise ValueError(f"'{value}' is not a full link: start it with https://")
    if any(c in value for c in ' "<>'):
        raise ValueError(f"'{value}' contains spaces, quotes or angle brackets: encode them")
    return value


def parse_local_time(value: str) -> datetime:
    """'2026-12-03 09:00' → naive datetime (the zone is applied by the caller)."""
    for fmt in TIME_FORMATS:
        try:
            return datetime.strptime(value.strip(), fmt)
        except ValueError:
            continue
    raise ValueError(f"'{value}' is not a date and time: write it as YYYY-MM-DD HH:MM")


LINK = "https://, http://, mailto: or tel: link, or a merge field like {{ links.view_online }}"


class Image(Strict):
    """A picture, optionally a link."""

    src: str = Field(description="address of the picture (" + LINK + ")",
                     examples=["https://imag.example.org/bilder/2026/strassenfest-nordmarkt.jpg"])
    alt: str = Field(min_length=1, description="what the picture shows, in words: read aloud "
                     "to blind readers and shown when pictures are blocked",
                     examples=["Lange Tische auf dem Nordmarkt beim Straßenfest"])
    href: str | None = Field(None, description="where a click on the picture leads (" + LINK
                             + ")", examples=["https://imag.example.org/galerie/strassenfest"])
    width: int | None = Field(None, ge=16, le=600, description="width in pixels, 16 to 600 "
                              "(default: the full width of the mail)", examples=[600])

    _src = field_validator("src", "href")(lambda v: v if v is None else _url(v))
    _alt = field_validator("alt")(lambda v: _one_line(v, "alt"))


class Button(Strict):
    """A button that opens a link."""

    label: str = Field(min_length=1, max_length=80, description="the text on the button, one "
                       "line, at most 80 characters", examples=["Jetzt anmelden"])
    url: str = Field(description="where the button leads (" + LINK + ")",
                     examples=["https://imag.example.org/forum-integration/anmeldung"])

    _u = field_validator("url")(lambda v: _url(v))
    _l = field_validator("label")(lambda v: _one_line(v, "label"))


TIME = "YYYY-MM-DD HH:MM, local time (config.yaml 'timezone')"


class Event(Strict):
    """A date: shown with place and time; an .ics calendar file is attached."""

    title: str = Field(min_length=1, description="what happens",
                       examples=["FORUM INTEGRATION: Gute Nachbarschaft"])
    start: str = Field(description="when it begins: " + TIME, examples=["2026-12-10 18:00"])
    end: str | None = Field(None, description="when it ends: " + TIME + "; not before start",
                            examples=["2026-12-10 20:30"])
    place: str = Field(min_length=1, description="where: the name of the place",
                       examples=["Auslandsgesellschaft.de"])
    address: str | None = Field(None, description="street, postcode and town of the place",
                                examples=["Steinstraße 48, 44147 Dortmund"])
    description: str | None = Field(None, description="a few words more about the event",
                                    examples=["Der Eintritt ist frei."])
    calendar: bool = Field(True, description="attach an .ics calendar file (default true)",
                           examples=[False])
    id: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,79}$",
                           description="a name for this event (a-z, 0-9, -) that stays the same "
                           "in every language and every campaign announcing it: calendars then "
                           "update one entry instead of adding another", examples=[
                               "integrationskonferenz-2027"])
    url: str | None = Field(None, description="a page about the event (" + LINK + "); goes "
                            "into the calendar entry", examples=["https://www.example.org/ik"])

    _event_url = field_validator("url")(lambda v: v if v is None else _url(v))

    @field_validator("start", "end")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            parse_local_time(value)
        return value

    @model_validator(mode="after")
    def _order(self) -> Event:
        if self.end and parse_local_time(self.end) < parse_local_time(self.start):
            raise ValueError("the event ends before it starts: check 'end'")
        return self


class Quote(Strict):
    """A quotation, set apart from the text."""

    text: str = Field(min_length=1, description="the words quoted",
                      examples=["Wir gehen diesen Weg gemeinsam – mit aufrechtem Gang."])
    author: str | None = Field(None, description="who said it",
                               examples=["Aus dem Sprecherrat des Trägerkreises IMAG"])


BLOCK_KINDS = ("heading", "text", "image", "button", "event", "quote", "divider")
MERGE = "; merge fields like {{ recipient.name }} work here"


class Block(Strict):
    """One block of content: a mapping with exactly one of the kinds as its key."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    heading: str | None = Field(None, description="a heading, one line" + MERGE,
                                examples=["Liebe {{ recipient.name }}"])
    text: str | None = Field(None, description="a paragraph or more, in Markdown (**bold**, "
                             "[link](https://…), lists with -)" + MERGE,
                             examples=["Das **FORUM INTEGRATION** lädt ein."])
    image: Image | None = Field(None, description="a picture: src, alt, optional href and "
                                "width", examples=[{"src": "https://imag.example.org/plakat.jpg",
                                                    "alt": "Plakat zum Straßenfest"}])
    button: Button | None = Field(None, description="a button: label and url",
                                  examples=[{"label": "Jetzt anmelden",
                                             "url": "https://imag.example.org/anmeldung"}])
    event: Event | None = Field(None, description="a date: title, start, place, optional end, "
                                "address, description", examples=[{
                                    "title": "FORUM INTEGRATION", "start": "2026-12-10 18:00",
                                    "place": "Auslandsgesellschaft.de"}])
    quote: Quote | None = Field(None, description="a quotation: text, optional author",
                                examples=[{"text": "Wir ALLE sind Dortmund.",
                                           "author": "Trägerkreis IMAG"}])
    divider: dict[str, Any] | None = Field(None, description="a horizontal line; write "
                                           "'- divider: {}'", examples=[{}])

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(
                f"a block must be a mapping like '- text: ...', not plain text ('{data[:30]}')"
            )
        if isinstance(data, dict):
            known = [k for k in data if k in BLOCK_KINDS]
            unknown = [k for k in data if k not in BLOCK_KINDS]
            if unknown:
                hint = closest(str(unknown[0]), BLOCK_KINDS)
                raise ValueError(
                    f"unknown block kind '{unknown[0]}'"
                    + (f"; did you mean '{hint}'?" if hint else "")
                    + f" (kinds: {', '.join(BLOCK_KINDS)})"
                )
            if len(known) != 1:
                raise ValueError(
                    "each block has exactly one kind; start a new '- ' item for each block"
                )
            if known == ["divider"] and data["divider"] is None:
                return {"divider": {}}
        return data

    @property
    def kind(self) -> str:
        return next(iter(self.model_fields_set))

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    _h = field_validator("heading")(lambda v: v if v is None else _one_line(v, "a heading"))


class Content(Strict):
    """The mail in one language."""

    subject: str = Field(min_length=1, max_length=200, description="the subject line of the "
                         "mail, one line, at most 200 characters" + MERGE,
                         examples=["Wir ALLE sind Dortmund – Neues im Dezember"])
    preheader: str = Field("", max_length=250, description="the short line mail programs show "
                           "after the subject, at most 250 characters" + MERGE,
                           examples=["Einladung zum FORUM INTEGRATION am 10. Dezember"])
    blocks: list[Block] = Field(min_length=1, description="the content, top to bottom: a list "
                                "of '- kind: …' items; kinds: " + ", ".join(BLOCK_KINDS),
                                examples=[[{"heading": "Liebe {{ recipient.name }}"},
                                           {"text": "Das **FORUM INTEGRATION** lädt ein."}]])

    _s = field_validator("subject")(lambda v: _one_line(v, "the subject"))
    _p = field_validator("preheader")(lambda v: _one_line(v, "the preheader"))


LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


def _language(lang: str) -> str:
    if lang in Content.model_fields:
        raise ValueError(f"'{lang}' is not a language code: the fields of a language go one "
                         "level deeper, under the language (e.g. 'de:')")
    try:
        Locale.parse(lang.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValueError(f"'{lang}' is not a language code (use e.g. de, tr, ar)") from None
    return lang


Language = Annotated[str, AfterValidator(_language)]


class Audience(Strict):
    """Who gets the mail."""

    lists: list[str] = Field(min_length=1, description="names of list files under lists/ "
                             "(without .csv/.yaml) or of managed subscriber lists",
                             examples=[["newsletter-demo", "partners"]])
    languages: list[str] | None = Field(None, description="only recipients whose language is "
                                        "one of these (default: everyone on the lists)",
                                        examples=[["de", "tr"]])


class Schedule(Strict):
    """When the scheduler (mailer run) sends it: either at or cron."""

    at: str | None = Field(None, description="send once, at this time: " + TIME,
                           examples=["2026-12-03 09:00"])
    cron: str | None = Field(None, description="send repeatedly: five fields, minute hour day "
                             "month weekday, local time", examples=["0 9 1 * *"])

    @model_validator(mode="after")
    def _one(self) -> Schedule:
        if (self.at is None) == (self.cron is None):
            raise ValueError("give either 'at' (one date and time) or 'cron', not both or neither")
        return self


class Campaign(Strict):
    """One campaign file under campaigns/: what to send, to whom, and when."""

    id: str = Field(description="optional; defaults to the file name without .yaml; lower-case "
                    "letters, digits and dashes", examples=["wir-alle-sind-dortmund-2026-12"],
                    json_schema_extra={"pattern": ID_RE.pattern})
    title: str | None = Field(None, description="a name for the campaign in reports and the "
                              "archive (default: the subject of the first language)",
                              examples=["Wir ALLE sind Dortmund – Dezember 2026"])
    template: str = Field(pattern=r"^[a-z0-9_-]+$", description="the layout: a file "
                          "templates/<name>.mjml.j2", examples=["newsletter"])
    audience: Audience = Field(description="who gets the mail: lists, optionally only some "
                               "languages", examples=[{"lists": ["newsletter-demo",
                                                                 "partners"]}])
    schedule: Schedule | None = Field(None, description="when 'mailer run' sends it: at a time "
                                      "or by cron; leave it out to send only with 'mailer send'",
                                      examples=[{"at": "2026-12-03 09:00"},
                                                {"cron": "0 9 1 * *"}])
    content: dict[Language, Content] = Field(
        min_length=1, description="the mail per language code (de, tr, ar, …); the first "
        "language is the default for recipients whose language the campaign lacks",
        examples=[{"de": {"subject": "Wir ALLE sind Dortmund",
                          "blocks": [{"text": "Das **FORUM INTEGRATION** lädt ein."}]}}],
        json_schema_extra={"propertyNames": {"pattern": LANGUAGE_PATTERN}})
    attachments: list[str] = Field([], description="files to attach, relative to the campaign "
                                   "file and inside its folder; together at most 10 MiB",
                                   examples=[["files/flyer.pdf"]])
    archive: bool = Field(True, description="show it in the public archive behind 'view "
                          "online' once it went out (default true); false for internal mails",
                          examples=[False])

    _source: Path | None = PrivateAttr(None)
    _lines: dict[Any, int] = PrivateAttr(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ID_RE.match(value):
            raise ValueError(
                f"'{value}' is not a valid id: use lower-case letters, digits and dashes"
            )
        return value

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def default_language(self) -> str:
        return next(iter(self.content))

    @property
    def languages(self) -> list[str]:
        return list(self.content)

    @property
    def display_title(self) -> str:
        return self.title or self.content[self.default_language].subject

    def line(self, *loc: str | int) -> int | None:
        path = tuple(loc)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    def error(self, message: str, *loc: str | int) -> CampaignError:
        from .yamlsrc import dotted

        return CampaignError(
            message, path=self._source, line=self.line(*loc), field=dotted(loc) or None
        )


class CampaignProblems(CampaignError):
    """Several problems of one campaign file, in line order (`problems`). Raised as one
    CampaignError whose sentence is the first problem and counts the others, so every command
    that reports one sentence still can; `mailer validate` prints each of them."""

    def __init__(self, problems: list[CampaignError]) -> None:
        self.problems = problems
        first = problems[0]
        super().__init__(first.message, path=first.path, line=first.line, field=first.field)

    def sentence(self) -> str:
        more = len(self.problems) - 1
        return (super().sentence() + f" (and {more} more problem{'s' if more > 1 else ''} in "
                "this file: 'mailer validate' lists them all)")


def raise_all(problems: list[CampaignError]) -> None:
    """Nothing when there is no problem; the one, or all of them in line order."""
    flat = [p for problem in problems
            for p in (problem.problems if isinstance(problem, CampaignProblems) else [problem])]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise CampaignProblems(sorted(flat, key=lambda p: p.line or 0))


def json_schema(templates: list[str] | None = None) -> dict[str, Any]:
    """The JSON Schema of a campaign file: every field with a description and an example (an
    editor with the YAML language server shows them on hover); `templates` become an enum."""
    schema = Campaign.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "imag-mailer campaign"
    schema["required"] = [name for name in schema["required"] if name != "id"]
    if templates:
        schema["properties"]["template"]["enum"] = sorted(templates)
    return schema


NOT_LAYOUTS = frozenset({"base", "blocks", "confirmation"})  # shared parts; the opt-in mail


def template_names(settings: Settings) -> list[str]:
    """The layouts a campaign can name: templates/<name>.mjml.j2 but the shared base and blocks
    and the double opt-in mail's own layout."""
    return sorted(name for p in settings.templates_dir.glob("*.mjml.j2")
                  if (name := p.name.removesuffix(".mjml.j2")) not in NOT_LAYOUTS)


def load_campaign(
    path: Path, settings: Settings, *, warnings: list[str] | None = None
) -> Campaign:
    """Parse and check one campaign file; raises CampaignError with file and line."""
    located = load_yaml(path, error=CampaignError)
    data = located.data
    if not isinstance(data, dict):
        raise CampaignError(
            "a campaign file must be a mapping (id:, template:, audience:, content: …)",
            path=path,
            line=1,
        )
    data = dict(data)
    data.setdefault("id", path.name.removesuffix(".yaml").removesuffix(".yml"))
    if "content" in data and isinstance(data["content"], dict):
        data["content"] = {str(k): v for k, v in data["content"].items()}
    try:
        campaign = Campaign.model_validate(data)
    except ValidationError as exc:
        raise_all(validation_problems(exc, located, error=CampaignError, model=Campaign))
        raise
    campaign._source = path
    campaign._lines = located.lines
    _check_references(campaign, located, settings, warnings)
    return campaign


def _check_references(
    campaign: Campaign, located: Located, settings: Settings, warnings: list[str] | None
) -> None:
    """What needs more than the file itself (templates, lists, the clock, attachments): every
    problem found, in line order."""
    from .audience import known_lists

    problems: list[CampaignError] = []
    template = settings.templates_dir / f"{campaign.template}.mjml.j2"
    if campaign.template in NOT_LAYOUTS or not template.is_file():
        layouts = template_names(settings)
        hint = closest(campaign.template, layouts)
        problems.append(campaign.error(
            f"unknown template '{campaign.template}'"
            + (f"; did you mean '{hint}'?" if hint else "")
            + f" (templates: {', '.join(layouts)})",
            "template",
        ))
    lists = known_lists(settings)
    for i, name in enumerate(campaign.audience.lists):
        if name not in lists:
            hint = closest(name, lists)
            problems.append(campaign.error(
                f"unknown list '{name}'"
                + (f"; did you mean '{hint}'?" if hint else "")
                + f" (lists: {', '.join(sorted(lists))})",
                "audience",
                "lists",
                i,
            ))
    for check in (lambda: _check_schedule(campaign, settings, warnings),
                  lambda: read_attachments(campaign)):
        try:
            check()
        except CampaignError as exc:
            problems.append(exc)
    raise_all(problems)


def read_attachments(campaign: Campaign) -> list[tuple[str, bytes]]:
    """(file name, content) of each attachment: regular files inside the campaign's folder,
    symlinks resolved, the size cap applied to what is actually read (not to what stat says)."""
    base = (campaign.source.parent if campaign.source else Path(".")).resolve()
    out: list[tuple[str, bytes]] = []
    left = MAX_ATTACHMENTS_BYTES
    for i, name in enumerate(campaign.attachments):
        def fail(message: str, i: int = i) -> CampaignError:
            return campaign.error(message, "attachments", i)

        try:
            path = (base / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise fail(f"attachment '{name}' does not exist (paths are relative to the "
                       "campaign file)") from None
        if not path.is_relative_to(base) or path == base:
            raise fail(f"attachment '{name}' is outside the campaign's folder: put the file "
                       f"next to the campaign file, e.g. in {base.name}/files/")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise fail(f"attachment '{name}' cannot be read ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise fail(f"attachment '{name}' is not a regular file")
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(left + 1)
        left -= len(data)
        if left < 0:
            raise fail(f"attachments add up to more than {MAX_ATTACHMENTS_BYTES // 2**20} MiB: "
                       "link to large files instead")
        out.append((Path(name).name, data))
    return out


def _check_schedule(campaign: Campaign, settings: Settings, warnings: list[str] | None) -> None:
    schedule = campaign.schedule
    if schedule is None:
        return
    if schedule.cron is not None:
        from .triggers import cron_trigger

        try:
            cron_trigger(schedule.cron, settings.tz)
        except (ValueError, TypeError) as exc:
            raise campaign.error(
                f"'{schedule.cron}' is not a cron expression ({exc}); "
                "write five fields: minute hour day month weekday, e.g. '0 9 1 * *'",
                "schedule",
                "cron",
            ) from None
        return
    assert schedule.at is not None
    try:
        when = resolve_local(schedule.at, settings)
    except ValueError as exc:
        raise campaign.error(str(exc), "schedule", "at") from None
    if when < datetime.now(settings.tz) and warnings is not None:
        warnings.append(
            f"{campaign.source}, line {campaign.line('schedule', 'at')}: "
            f"schedule.at {schedule.at} is in the past; the scheduler will not send it "
            "(use 'mailer send' to send it now)"
        )


def resolve_local(value: str, settings: Settings) -> datetime:
    """A wall-clock time in the configured zone; refuses times DST skips or repeats."""
    naive = parse_local_time(value)
    tz = settings.tz
    early, late = naive.replace(tzinfo=tz, fold=0), naive.replace(tzinfo=tz, fold=1)
    if early.utcoffset() != late.utcoffset():
        roundtrips = {d.astimezone(UTC).astimezone(tz).replace(tzinfo=None) for d in (early, late)}
        if roundtrips != {naive}:
            raise ValueError(
                f"{value} does not exist in {settings.timezone} (the clocks jump forward "
                "that night): pick a time outside the gap"
            )
        raise ValueError(
            f"{value} happens twice in {settings.timezone} (the clocks go back that night): "
            "pick a time outside 02:00–03:00"
        )
    return early


def campaign_files(settings: Settings) -> list[Path]:
    directory = settings.campaigns_dir
    return sorted(p for p in directory.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def find_campaign(ref: str, settings: Settings) -> Path:
    """A path to a campaign file, or the id of one under campaigns/."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    for candidate in campaign_files(settings):
        if candidate.stem == ref:
            return candidate
    ids = [p.stem for p in campaign_files(settings)]
    hint = closest(ref, ids)
    raise CampaignError(
        f"no campaign '{ref}' in {settings.campaigns_dir}"
        + (f"; did you mean '{hint}'?" if hint else f" (campaigns: {', '.join(ids) or 'none'})")
    )
