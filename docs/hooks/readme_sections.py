"""MkDocs hook: pages quote sections of README.md, so the README stays the one source.

A line ``<!-- readme: Section title -->`` in a page is replaced by the body of the README section
with that ``## `` heading (``<!-- readme: -->`` with no title: the text before the first section).
A title that the README lacks fails the build and names the page and the title.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError

_MARKER = re.compile(r"^<!-- readme:\s*(.*?)\s*-->$", re.MULTILINE)


def readme_sections(text: str) -> dict[str, str]:
    """Split a README into ``{heading: body}`` at ``## `` headings outside code fences.

    The text before the first section (after the ``# `` title) is under the key ``""``.

    Example:
        >>> readme_sections("# t\\nintro\\n## A\\nbody\\n")["A"]
        'body\\n'
    """
    sections: dict[str, list[str]] = {"": []}
    current, in_fence = "", False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif not in_fence and line.startswith("# ") and current == "":
            continue  # the document title: each page has its own
        else:
            sections[current].append(line)
    return {name: "".join(lines).strip("\n") + "\n" for name, lines in sections.items()}


def on_page_markdown(markdown, page, config, files):
    if not _MARKER.search(markdown):
        return markdown
    readme = Path(config["config_file_path"]).parent / "README.md"
    sections = readme_sections(readme.read_text(encoding="utf-8"))

    def quote(match: re.Match) -> str:
        title = match.group(1)
        if title not in sections:
            raise PluginError(f"{page.file.src_uri}: README.md has no section '## {title}'; "
                              f"its sections are {sorted(s for s in sections if s)}. Fix the marker "
                              f"'<!-- readme: {title} -->' or the README heading.")
        return sections[title]

    return _MARKER.sub(quote, markdown)
