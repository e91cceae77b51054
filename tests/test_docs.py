"""The README stays a page and the documentation stays connected: README.md has at most MAX_README_LINES
lines; every relative link in README.md and docs/*.md names a file that exists and, with a ``#fragment``,
a heading of that file (GitHub's anchors); every docs/*.md file is linked from the README.

    python -m pytest -q tests/test_docs.py

Markdown only (no torch). Links inside code (fenced blocks and `spans`) are not links and are not read;
http(s) and mailto links are not followed. Trade-off: anchors are computed as GitHub computes them for
plain headings (lowercase, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats), not for
headings with HTML or explicit anchors, which these files do not use.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_README_LINES = 260
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks, indented code blocks and inline code spans."""
    out, fenced, code, previous = [], False, False, ""
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        # an indented code block starts after a blank line (a list item's continuation does not)
        code = line.startswith("    ") and (code or not previous.strip()) or code and not line.strip()
        previous = line
        if fenced or code:
            continue
        out.append(re.sub(r"`[^`]*`", "``", line))
    return "\n".join(out)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def problems(root: Path) -> list[str]:
    """Every broken promise of the README and docs/ under ``root``, one line each ([] when none)."""
    found: list[str] = []
    readme = root / "README.md"
    lines = readme.read_text().count("\n")
    if lines > MAX_README_LINES:
        found.append(f"README.md: {lines} lines, more than {MAX_README_LINES}: move sections to docs/")
    docs = sorted((root / "docs").glob("*.md"))
    for page in [readme, *docs]:
        name = page.relative_to(root).as_posix()
        for target in links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                found.append(f"{name}: link {target!r}: no file {path}")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
                found.append(f"{name}: link {target!r}: no heading #{fragment} in {dest.relative_to(root).as_posix()}")
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme.read_text())}
    for page in docs:
        if page.resolve() not in linked:
            found.append(f"{page.relative_to(root).as_posix()}: not linked from README.md")
    return found


def test_readme_and_docs_links_hold():
    found = problems(REPO)
    assert found == [], "\n".join(found)


def test_the_readme_keeps_its_set_up_commands_and_a_table_of_contents():
    text = (REPO / "README.md").read_text()
    assert "    pip install torch==2.13.0 && pip install -e . && lvita demo\n" in text
    assert ('    pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -n 2 --dist loadfile\n'
            in text)
    for topic in ("curriculum", "stage_keys", "data_formats", "cluster", "checkpoints", "evaluation", "design",
                  "longest_sequence"):
        assert f"](docs/{topic}.md" in text, topic


def test_anchors_as_github_makes_them():
    text = "# Stage 1: `1_align.json`\n## Table 1's data: what to download\n## V-NIAH: video, as LongVA runs it\n" \
           "```\n# not a heading\n```\n## Resuming\n## Resuming\n## `--suggest`: a layout that fits\n"
    assert anchors(text) == {"stage-1-1_alignjson", "table-1s-data-what-to-download",
                             "v-niah-video-as-longva-runs-it", "resuming", "resuming-1", "--suggest-a-layout-that-fits"}


def test_broken_links_long_readme_and_orphans_are_caught(tmp_path):
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    for other in ("hostfiles", "tests"):  # targets of links from the README and docs/
        (tmp_path / other).mkdir()
        shutil.copy(REPO / other / "README.md", tmp_path / other / "README.md")
    shutil.copy(REPO / "BENCHMARKS.md", tmp_path / "BENCHMARKS.md")
    assert problems(tmp_path) == []
    # a moved section whose heading changed: the links into it break
    cluster = tmp_path / "docs" / "cluster.md"
    cluster.write_text(cluster.read_text().replace("## Running under a scheduler", "## Schedulers"))
    # a link written as if the page were still at the top (docs/ is one level down)
    keys = tmp_path / "docs" / "stage_keys.md"
    keys.write_text(keys.read_text() + "\nSee [the design](docs/design.md).\n")
    # a new page nobody links to, and a README past its limit
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n\n[back](../README.md) `[code](nowhere.md)`\n")
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "line\n" * MAX_README_LINES)
    found = problems(tmp_path)
    assert found[0].startswith("README.md: ")
    assert found[0].endswith(f"more than {MAX_README_LINES}: move sections to docs/")
    assert "README.md: link 'docs/cluster.md#running-under-a-scheduler': no heading #running-under-a-scheduler " \
           "in docs/cluster.md" in found
    assert "docs/stage_keys.md: link 'cluster.md#running-under-a-scheduler': no heading " \
           "#running-under-a-scheduler in docs/cluster.md" in found
    assert "docs/stage_keys.md: link 'docs/design.md': no file docs/design.md" in found
    assert "docs/orphan.md: not linked from README.md" in found
    assert not any("nowhere.md" in p for p in found)  # inside a code span: not a link
