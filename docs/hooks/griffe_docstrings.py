"""Griffe extension: render jaxic's docstring conventions well on the documentation site.

jaxic's docstrings are Google style with two habits a Google parser reads differently:

- a single ``Example:`` section holding ``>>>`` lines: read as ``Examples:``, so that the lines
  become highlighted code (an ``Example:`` admonition would render them as nested quotes and read
  ``d["x"]`` as a Markdown link);
- Sphinx roles (``:class:`Proposal```): rendered as inline code, role dropped.

The source is left as it is; only the text that griffe parses changes.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc):`~?([^`]+)`")


def rewrite(docstring: str) -> str:
    """The docstring with ``Example:`` read as ``Examples:`` and Sphinx roles as inline code.

    Example:
        >>> rewrite("See :class:`jaxic.Proposal`.\\n\\nExample:\\n    >>> f()")
        'See `jaxic.Proposal`.\\n\\nExamples:\\n    >>> f()'
    """
    return _ROLE.sub(r"`\1`", _EXAMPLE.sub(r"\1Examples:", docstring))


class DocstringConventions(griffe.Extension):
    """Rewrites every object's docstring with :func:`rewrite` as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
