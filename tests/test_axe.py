"""axe-core on the mails themselves: every shipped campaign, every language, at the width of the
mail (600 px) and of a phone (375 px), in headless Debian chromium. No violation of any impact.

axe-core comes from npm into tests/js/node_modules (`npm ci --prefix tests/js`, done by .ci/run);
the test skips only when chromium or that file is missing. The page loads nothing from the
network: images are blocked, as in a mail program that does not load them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailer.preview import write_preview
from tests.conftest import REPO, Project
from tests.test_browser import ARGS, CHROMIUM

AXE = REPO / "tests" / "js" / "node_modules" / "axe-core" / "axe.min.js"
SHIPPED = sorted(p.stem for p in (REPO / "campaigns").glob("*.yaml"))
WIDTHS = (600, 375)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
    pytest.mark.skipif(not AXE.exists(), reason="needs axe-core: npm ci --prefix tests/js"),
]

RUN_AXE = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.map(v => ({
    id: v.id, impact: v.impact,
    nodes: v.nodes.slice(0, 3).map(n => n.target.join(" ") + " :: " + n.failureSummary),
  }));
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


def violations(browser: Any, html: str, width: int) -> list[dict[str, Any]]:
    page = browser.new_page(viewport={"width": width, "height": 900})
    try:
        page.route("**/*", lambda route: route.abort())
        page.set_content(html, wait_until="load")
        page.add_script_tag(path=str(AXE))
        return list(page.evaluate(RUN_AXE))
    finally:
        page.close()


@pytest.mark.parametrize("campaign", SHIPPED)
def test_no_axe_violations_in_any_language_or_width(browser: Any, project: Project,
                                                    tmp_path: Path, campaign: str) -> None:
    for name in SHIPPED:
        (project.root / "campaigns" / f"{name}.yaml").write_bytes(
            (REPO / "campaigns" / f"{name}.yaml").read_bytes())
    files = write_preview(project.settings(), campaign, tmp_path, langs=[], recipient=None,
                          png=False)
    pages = sorted(f for f in files if f.suffix == ".html")
    assert len(pages) >= 2  # every shipped campaign has at least two languages
    found = {}
    for path in pages:
        html = path.read_text(encoding="utf-8")
        for width in WIDTHS:
            found[f"{path.name} @ {width}px"] = violations(browser, html, width)
    assert {k: v for k, v in found.items() if v} == {}
