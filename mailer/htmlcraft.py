"""Finishing the HTML that MJML compiled, once per language: landmarks, `<body lang dir>`, styles
inlined for the mail apps that drop `<style>`.

MJML (MRML) cannot set roles or body attributes, so the layouts mark what they mean and this
module, reading the HTML with a real tokenizer (`html.parser`: comments, Outlook's conditional
comments and style text are tokens of their own, never matched by accident), turns the marks into
markup:

- sections with css-class `imag-banner` (header) and `imag-contentinfo` (footer) are wrapped in
  `<div role="banner">` and `<div role="contentinfo">`, everything between them in
  `<div role="main">`, each together with the Outlook-only table comments around its sections;
- `<body>` gets the `lang` and `dir` of `<html>`, so a client that keeps only the body still knows
  the language and direction;
- the `<style>` whose text holds `/* imag:inline */` (the layout's mj-style) is inlined into
  `style=""` attributes by css-inline; its @media rules stay in `<head>`. MJML's own style blocks
  (resets, responsive columns, Thunderbird's media-attribute block) are left as they are.

Merge fields are opaque placeholders at this point (see `render.Snippets`): they are text and
attribute values to the tokenizer and the inliner, and come out unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

import css_inline

INLINE_MARK = "/* imag:inline */"
LANDMARKS = ("banner", "contentinfo")
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                  "source", "track", "wbr"})

# Nothing is fetched at render time (a <link> in a custom layout stays a link); only the marked
# block is inlined, then reduced to what could not be inlined (@media, selectors matching nothing).
_INLINER = css_inline.CSSInliner(
    inline_style_tags=True,
    keep_style_tags=True,
    keep_link_tags=True,
    keep_at_rules=True,
    remove_inlined_selectors=True,
    load_remote_stylesheets=False,
)


class LayoutError(ValueError):
    """The compiled layout cannot be given its landmarks (a template mistake, not staff's)."""


def finish(html: str) -> str:
    """Landmarks, body lang/dir and inlined text styles for one language's compiled HTML."""
    scan = _Scan(html)
    edits = [*_body_edits(scan), *_style_edits(scan), *_landmark_edits(scan)]
    return _same_doctype(html, _INLINER.inline(_apply(html, edits)))


def _same_doctype(source: str, inlined: str) -> str:
    """The inliner writes `<!DOCTYPE html>`; keep MJML's spelling, so the mail's bytes change
    only where something was meant to change."""
    doctype = "<!doctype html>"
    if source[:15].lower() == doctype and inlined[:15].lower() == doctype:
        return source[:15] + inlined[15:]
    return inlined


@dataclass
class _Element:
    tag: str
    start: int
    start_end: int
    parent: int  # index into _Scan.elements, -1 for the top
    classes: tuple[str, ...]
    attrs: dict[str, str]
    end: int = -1
    text: list[str] = field(default_factory=list)


class _Scan(HTMLParser):
    """Every element with its offsets in the source, and every comment's span."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=False)
        self.html = html
        self.lines = [0, *(m.end() for m in re.finditer("\n", html))]  # line starts
        self.elements: list[_Element] = []
        self.comments: dict[int, int] = {}  # start → end
        self.comment_ends: dict[int, int] = {}  # end → start
        self.open: list[int] = []
        self.feed(html)
        self.close()

    def _offset(self) -> int:
        line, col = self.getpos()
        return self.lines[line - 1] + col

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        start = self._offset()
        text = self.get_starttag_text() or ""
        values = {k: v or "" for k, v in attrs}
        element = _Element(tag=tag, start=start, start_end=start + len(text),
                           parent=self.open[-1] if self.open else -1,
                           classes=tuple(values.get("class", "").split()), attrs=values)
        self.elements.append(element)
        if tag in VOID:
            element.end = element.start_end
        else:
            self.open.append(len(self.elements) - 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            index = self.open.pop()
            self.elements[index].end = self.elements[index].start_end

    def handle_endtag(self, tag: str) -> None:
        start = self._offset()
        end = self.html.index(">", start) + 1
        # Close up to the matching element (a stray end tag closes nothing).
        for depth in range(len(self.open) - 1, -1, -1):
            if self.elements[self.open[depth]].tag == tag:
                for index in self.open[depth:]:
                    self.elements[index].end = end
                del self.open[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self.open:
            self.elements[self.open[-1]].text.append(data)

    def handle_comment(self, data: str) -> None:
        start = self._offset()
        end = start + len(data) + 7  # "<!--" + data + "-->"
        self.comments[start] = end
        self.comment_ends[end] = start

    def first(self, tag: str) -> _Element | None:
        return next((e for e in self.elements if e.tag == tag), None)


Edit = tuple[int, int, str]  # replace html[start:end] with the text


def _apply(html: str, edits: list[Edit]) -> str:
    out: list[str] = []
    last = 0
    for start, end, text in sorted(edits, key=lambda e: (e[0], e[1])):
        if start < last:
            raise LayoutError("overlapping edits of the compiled layout")
        out += [html[last:start], text]
        last = end
    out.append(html[last:])
    return "".join(out)


def _retag(element: _Element, html: str, *, add: dict[str, str] | None = None,
           drop: tuple[str, ...] = ()) -> Edit:
    """The element's start tag written anew: its attributes without `drop`, then `add`."""
    attrs = {k: v for k, v in element.attrs.items() if k not in drop} | (add or {})
    text = "".join(f' {k}="{_attr_escape(v)}"' for k, v in attrs.items())
    slash = "/" if html[element.start_end - 2] == "/" else ""
    return (element.start, element.start_end, f"<{element.tag}{text}{slash}>")


def _attr_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _body_edits(scan: _Scan) -> list[Edit]:
    """<body> gets lang and dir; the mail's article loses its aria-label.

    MJML names the article after <mj-title>; axe's "region" rule counts that name as content
    outside every landmark. The mail keeps its name as <title> and as its one <h1>.
    """
    root, body = scan.first("html"), scan.first("body")
    if root is None or body is None:
        return []
    edits = []
    missing: dict[str, str] = {k: root.attrs[k] for k in ("lang", "dir")
                               if k in root.attrs and k not in body.attrs}
    if missing:
        edits.append(_retag(body, scan.html, add=missing))
    body_index = scan.elements.index(body)
    edits += [_retag(e, scan.html, drop=("aria-label",)) for e in scan.elements
              if e.parent == body_index and e.attrs.get("role") == "article"
              and "aria-label" in e.attrs]
    return edits


def _style_edits(scan: _Scan) -> list[Edit]:
    """css-inline inlines every style block it is not told to skip: skip all but the marked one."""
    return [_retag(e, scan.html, add={"data-css-inline": "ignore"})
            for e in scan.elements
            if e.tag == "style" and INLINE_MARK not in "".join(e.text)
            and "data-css-inline" not in e.attrs]


def _landmark_edits(scan: _Scan) -> list[Edit]:
    spans = {role: _span(scan, f"imag-{role}") for role in LANDMARKS}
    banner, footer = spans["banner"], spans["contentinfo"]
    if banner is None or footer is None:
        return []  # a layout without the marks gets no landmarks, as before
    if not banner[1] <= footer[0]:
        raise LayoutError("the imag-banner sections must come before the imag-contentinfo ones")
    return [
        (banner[0], banner[0], '<div role="banner">'),
        (banner[1], banner[1], '</div><div role="main">'),
        (footer[0], footer[0], '</div><div role="contentinfo">'),
        (footer[1], footer[1], "</div>"),
    ]


def _span(scan: _Scan, css_class: str) -> tuple[int, int] | None:
    """From the first to the last element with the class, with their Outlook comments: they
    must be siblings, with no other element between them."""
    marked = [i for i, e in enumerate(scan.elements) if css_class in e.classes]
    if not marked:
        return None
    first, last = scan.elements[marked[0]], scan.elements[marked[-1]]
    between = [e for e in scan.elements[marked[0]:]
               if e.parent == first.parent and first.start <= e.start < last.end]
    if any(css_class not in e.classes for e in between) or last.parent != first.parent:
        raise LayoutError(f"the sections with css-class {css_class} must follow one another")
    start, end = first.start, last.end
    start = scan.comment_ends.get(start, start)  # <!--[if mso | IE]><table…><![endif]-->
    end = scan.comments.get(end, end)  # <!--[if mso | IE]></table><![endif]-->
    return start, end
