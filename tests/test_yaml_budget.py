"""YAML as a trust boundary: budgets (aliases, values, depth, size) and one sentence per problem.

Hostile documents go through the public loaders (campaign, list, config, `load_yaml`) and must
end in a `UserError` naming file and line, or load; never another exception, never a long wait.
Alias bombs run in a subprocess under RLIMIT_AS, so a regression fails instead of eating the
machine.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer import yamlsrc
from mailer.audience import load_list
from mailer.campaign import load_campaign
from mailer.config import load_settings
from mailer.errors import CampaignError, ListError, UserError
from mailer.yamlsrc import Budget, load_yaml
from tests.conftest import Project
from tests.helpers import run_mailer

MB = 1024 * 1024
MEMORY_LIMIT = 500 * MB
# Not a benchmark: catches exponential or quadratic blow-ups, with room for a busy machine and
# coverage tracing (5.5 s seen under bench/coverage.sh; a blow-up takes minutes).
SLOW_S = 20.0
GOOD = """\
template: newsletter
audience: {lists: [partners]}
content:
  de:
    subject: "Hallo {{ recipient.name }}"
    blocks:
      - heading: "Liebe Freundinnen und Freunde"
"""


def alias_bomb(key: str = "l") -> str:
    """'Billion laughs': 9 levels of 9 aliases each, about 400 bytes, 9^9 strings expanded."""
    lines = [f"{key}0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    lines += [f"{key}{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def test_the_bomb_is_small() -> None:
    assert len(alias_bomb()) < 420


# --- the bomb, in a subprocess with a memory limit ---------------------------------------------


def limited(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailer ARGS` with at most MEMORY_LIMIT of address space and a minute of time."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return run_mailer(project, *args, preexec_fn=limit)


def refused_bomb(result: subprocess.CompletedProcess[str], name: str) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if name in x]
    assert "line " in line and "uses too many aliases/anchors" in line
    assert "write the values out" in line
    return line


def test_alias_bomb_in_a_campaign_is_refused_in_one_sentence(project: Project) -> None:
    project.campaign("bomb.yaml", GOOD + alias_bomb())
    project.campaign("good.yaml", GOOD)
    result = limited(project, "validate")
    line = refused_bomb(result, "bomb.yaml")
    assert line.startswith("error: ") and ", line 13: " in line  # the alias that passed it
    assert "ok: " in result.stdout and "good.yaml" in result.stdout


def test_alias_bomb_in_a_list_file_is_refused(project: Project) -> None:
    project.list_file("bomb.yaml", "- email: a@example.org\n  x:\n" + "".join(
        f"    {line}\n" for line in alias_bomb().splitlines()))
    project.campaign("c.yaml", GOOD.replace("[partners]", "[bomb]"))
    refused_bomb(limited(project, "validate"), "bomb.yaml")


def test_alias_bomb_in_config_yaml_is_refused(project: Project) -> None:
    with project.config.open("a", encoding="utf-8") as config:
        config.write(alias_bomb("x_"))
    refused_bomb(limited(project, "schedule"), "config.yaml")


def test_alias_bomb_is_refused_at_the_alias_that_passes_the_budget() -> None:
    with pytest.raises(CampaignError) as caught:
        load_yaml(Path("c.yaml"), error=CampaignError, text=alias_bomb())
    # a4 stands for 66,430 values; the second *a4 on line 6 passes 100,000 (9^9 never happen)
    assert caught.value.line == 6 and "*a4 would make more than 100,000" in caught.value.message


# --- budgets ------------------------------------------------------------------------------------


def test_aliases_within_the_budget_are_expanded_and_copied() -> None:
    text = "de: &de {subject: Hallo, blocks: [{heading: Hi}]}\ntr: *de\nar: *de\n"
    located = load_yaml(Path("c.yaml"), error=CampaignError, text=text)
    assert located.data["tr"] == located.data["de"] == located.data["ar"]
    assert located.data["tr"] is not located.data["de"]
    assert located.line(("tr", "blocks", 0, "heading")) == 2  # the alias's line


@pytest.mark.parametrize(("text", "budget", "words"), [
    ("a: &a [1, 2, 3]\nb: [*a, *a, *a]\n", Budget(max_values=12), "*a would make more than 12"),
    ("a: &a x\nb: [*a, *a, *a]\n", Budget(max_aliases=2), "more than 2 *references"),
    ("a: [[[[x]]]]\n", Budget(max_depth=4), "nested more than 4 levels"),
    ("a: &a [[[x]]]\nb: [[*a]]\n", Budget(max_depth=5), "*a nests values more than 5 levels"),
    ("a: [1, 2, 3, 4]\n", Budget(max_values=4), "more than 4 values"),
    ("a: " + "x" * 100 + "\n", Budget(max_bytes=64), "KiB allowed"),
])
def test_each_budget_is_enforced(text: str, budget: Budget, words: str) -> None:
    with pytest.raises(CampaignError) as caught:
        load_yaml(Path("c.yaml"), error=CampaignError, text=text, budget=budget)
    assert words in caught.value.message


def test_the_shipped_files_fit_the_budgets(project: Project) -> None:
    from tests.conftest import REPO

    for path in sorted((REPO / "campaigns").glob("*.yaml")):
        load_campaign(path, project.settings())
    assert load_list(project.root / "lists" / "partners.yaml")
    load_yaml(REPO / "templates" / "strings.yaml", error=UserError)


# --- hostile documents through every public loader ----------------------------------------------

HOSTILE: dict[str, str | bytes] = {
    "nested-brackets": "[" * 100_000,
    "nested-braces": "{" * 100_000,
    "nested-flow-mappings": "{a: " * 100_000,
    "nested-block-lists": "- " * 100_000,
    "nested-block-mappings": "".join(" " * i + "a:\n" for i in range(200)),
    "nested-alias": "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 20 + "*a" + "]" * 20,
    "huge-int": "x: " + "9" * 5000,
    "huge-int-underscores": "x: 1" + "_0" * 100_000,
    "huge-sexagesimal-int": "x: 1" + ":00" * 300_000,
    "huge-hex-int": "x: 0x" + "f" * 500_000,
    "huge-float": "x: 1.0e+99999",
    "long-float": "x: " + "1" * 500_000 + ".5",
    "huge-sexagesimal-float": "x: 1" + ":00" * 300_000 + ".5",
    "python-object": "x: !!python/object:os.system {}",
    "python-apply": "!!python/object/apply:os.system [echo pwned]",
    "python-name": "x: !!python/name:os.system ''",
    "set": "x: !!set {a, b}",
    "custom-tag": "x: !shell rm -rf /",
    "binary-garbage": "x: !!binary '@@@ not base64'",
    "binary": "x: !!binary aGVsbG8=",
    "duplicate-keys": "a: 1\nb: 2\na: 3\n",
    "merge-key": "a: &a {b: 1}\nc: {<<: *a}\n",
    "undefined-alias": "a: *nothing\n",
    "self-alias": "a: &a [1, *a]\n",
    "duplicate-anchor": "a: &x 1\nb: &x 2\n",
    "two-documents": "a: 1\n---\nb: 2\n",
    "complex-key": "? [a, b]\n: 1\n",
    "nul-byte": b"a: b\x00c\n",
    "control-character": b"a: b\x1bc\n",
    "invalid-utf8": b"a: \xff\xfe b\n",
    "utf16": "a: b\n".encode("utf-16"),
    "bom": b"\xef\xbb\xbfa: b\n",
    "bom-twice": b"\xef\xbb\xbf\xef\xbb\xbfa: b\n",
    "long-line": "a: " + "x" * MB + "\n",
    "long-key": "x" * 100_000 + ": 1\n",
    "10-mb": "# " + "x" * (10 * MB) + "\n",
    "many-anchors": "".join(f"k{i}: &a{i} v{i}\n" for i in range(10_000)),
    "many-aliases": "a: &a x\nb: [" + ", ".join(["*a"] * 5000) + "]\n",
    "alias-bomb": alias_bomb(),
    "empty": "",
    "tabs": "a:\n\tb: 1\n",
    "unclosed-quote": 'a: "b\n',
    "bad-directive": "%YAML 2.0\n---\na: 1\n",
    "timestamp": "a: 2026-12-01 09:00:00\n",
}


def _load_config(project: Project, path: Path) -> Any:
    return load_settings(path, env=project.env)


LOADERS: dict[str, tuple[str, Callable[[Project, Path], Any]]] = {
    "campaign": ("campaigns/hostile.yaml", lambda p, path: load_campaign(path, p.settings())),
    "list": ("lists/hostile.yaml", lambda p, path: load_list(path)),
    "config": ("hostile-config.yaml", _load_config),
    "load_yaml": ("hostile.yaml", lambda p, path: load_yaml(path, error=UserError)),
}


@pytest.fixture(params=["libyaml", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both of PyYAML's parsers: libyaml's, and the pure-Python one used without libyaml."""
    if request.param == "python":
        monkeypatch.setattr(yamlsrc, "_Parser", yaml.SafeLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    yield request.param


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_document_is_one_sentence_or_loads(project: Project, parser: str, loader: str,
                                                   name: str) -> None:
    relative, load = LOADERS[loader]
    path = project.root / relative
    content = HOSTILE[name]
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    started = time.perf_counter()
    try:
        load(project, path)
    except UserError as exc:
        sentence = exc.sentence()
        assert str(path) in sentence and "\n" not in sentence and "Traceback" not in sentence
    elapsed = time.perf_counter() - started
    assert elapsed < SLOW_S, f"{name} through {loader} took {elapsed:.1f} s"


@pytest.mark.parametrize(("name", "words", "line"), [
    ("nested-brackets", "nested more than 50 levels", 1),
    ("huge-int", "more than 4,300 digits", 1),
    ("python-object", "tag !!python/object:os.system is not supported", 1),
    ("binary-garbage", "cannot read this value", 1),
    ("duplicate-keys", "key 'a' appears twice", 3),
    ("nul-byte", "control character U+0000", 1),
    ("invalid-utf8", "not UTF-8", 1),
    ("many-aliases", "uses too many aliases/anchors", 2),
    ("self-alias", "inside the value it names", 1),
    ("two-documents", "a second YAML document", 2),
])
def test_hostile_documents_get_the_right_sentence(project: Project, parser: str, name: str,
                                                  words: str, line: int) -> None:
    path = project.root / "hostile.yaml"
    content = HOSTILE[name]
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(UserError) as caught:
        load_yaml(path, error=UserError)
    assert words in caught.value.message and caught.value.line == line


def test_a_10_mb_yaml_list_is_refused_with_a_hint(project: Project) -> None:
    path = project.list_file("big.yaml", "".join(
        f"- {{email: person{i}@example.org, name: Person {i}}}\n" for i in range(250_000)))
    assert path.stat().st_size > 10 * MB
    with pytest.raises(ListError, match="save big lists as CSV"):
        load_list(path)


# --- generated documents ------------------------------------------------------------------------

leaves = st.sampled_from([
    "1", "x", "'q'", "~", "9" * 5000, "1.0e+99999", ".nan", "2026-12-01", "0x" + "f" * 40,
    "!!binary '@@'", "!!binary aGk=", "!!python/object:os.system {}", "!custom x", "*a", "*b",
    "&a x", "&b [1, 2]", "&a", "<<", "''", "!!str", "|\n  text",
])


def _mapping(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


documents = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(["a", "b", "1", "<<", "? x", "*a", "&k k"]), inner),
                 max_size=5).map(_mapping),
        inner.map(lambda x: "&a " + x),
        inner.map(lambda x: "&b " + x),
        st.integers(1, 120).map(lambda n: "[" * n + "]" * n),
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=documents)
def test_generated_documents_load_or_fail_in_one_sentence(text: str) -> None:
    try:
        load_yaml(Path("gen.yaml"), error=CampaignError, text=f"key: {text}\n")
    except CampaignError as exc:
        assert exc.path == "gen.yaml" and exc.line is not None and "\n" not in exc.message


# --- one broken file never stops the checks of the others ---------------------------------------


def test_validate_checks_every_file_and_reports_each_broken_one(project: Project) -> None:
    broken = {"deep.yaml": "[" * 100_000, "digits.yaml": GOOD + "x: " + "9" * 5000 + "\n",
              "nul.yaml": GOOD + "x: \0\n", "bomb.yaml": GOOD + alias_bomb()}
    for name, text in broken.items():
        project.campaign(name, text)
    project.campaign("a-good.yaml", GOOD)
    project.campaign("z-good.yaml", GOOD)
    result = limited(project, "validate")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for name in broken:
        [line] = [x for x in result.stderr.splitlines() if name in x]
        assert line.startswith("error: ") and ", line " in line
    assert "a-good.yaml" in result.stdout and "z-good.yaml" in result.stdout
    assert "4 of 6 campaign files have problems" in result.stderr


def test_validate_names_a_missing_campaign_and_checks_the_others(project: Project) -> None:
    project.campaign("good.yaml", GOOD)
    result = limited(project, "validate", "nope", "good")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "nope" in result.stderr and "ok: " in result.stdout and "good.yaml" in result.stdout


def test_schedule_lists_broken_files_on_stderr_and_the_others_on_stdout(project: Project) -> None:
    project.campaign("deep.yaml", "[" * 100_000)
    project.campaign("good.yaml", GOOD + 'schedule: {at: "2030-01-02 09:00"}\n')
    result = limited(project, "schedule")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if "deep.yaml" in x]
    assert line.startswith("error: ") and "nested more than 50 levels" in line
    assert result.stdout.startswith("good: at 2030-01-02 09:00; next 2030-01-02 09:00;")
