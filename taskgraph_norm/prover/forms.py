"""Canonical expressions built in time linear in their length.

A merge node's expression contains its operands' expressions, so building each
node's text by concatenation costs the sum of all their lengths: quadratic for
a left fold (``(((a+b)+c)+d)...``).  A :class:`Form` instead holds its pieces --
strings and the operands' forms, shared, never copied -- and knows its length;
:func:`render` writes a form out once, with one join.  Short forms are kept as
plain strings (copying a few hundred characters is cheaper than a node), so
only the large ones are trees.

Pure Python; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Form", "Text", "form", "pair", "length", "render"]

#: Forms up to this many characters are built eagerly as one string.
EAGER_CHARS = 256


class Form:
    """A canonical expression too long to build eagerly: pieces in reading order."""

    __slots__ = ("parts", "length")

    def __init__(self, parts: tuple[Text, ...], size: int) -> None:
        self.parts = parts
        self.length = size

    def __repr__(self) -> str:
        return f"<Form of {self.length} characters>"


#: A canonical expression: a plain string, or a :class:`Form` of pieces.
Text = str | Form


def length(text: Text) -> int:
    """Characters in ``text`` once rendered (without rendering it)."""
    return len(text) if isinstance(text, str) else text.length


def form(pieces: Iterable[Text]) -> Text:
    """The concatenation of ``pieces``: a string when short, else a :class:`Form`.

    Adjacent strings are merged, so a form's pieces alternate between strings and
    sub-forms and rendering visits each sub-form once.
    """
    parts: list[Text] = []
    size = 0
    run: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            run.append(piece)
            size += len(piece)
            continue
        if run:
            parts.append("".join(run))
            run = []
        parts.append(piece)
        size += piece.length
    if run:
        parts.append("".join(run))
    if size <= EAGER_CHARS:
        return "".join(render(p) for p in parts)
    return Form(tuple(parts), size)


def pair(left: str, a: Text, middle: str, b: Text, right: str) -> Text:
    """``left + a + middle + b + right``: :func:`form` for the binary merges, which
    are most nodes of a graph, without its loop."""
    if isinstance(a, str):
        if isinstance(b, str):
            if len(a) + len(b) <= EAGER_CHARS - len(left) - len(middle) - len(right):
                return f"{left}{a}{middle}{b}{right}"
            return Form((f"{left}{a}{middle}{b}{right}",), len(left) + len(a) + len(middle)
                        + len(b) + len(right))
        return Form((f"{left}{a}{middle}", b, right), len(left) + len(a) + len(middle)
                    + b.length + len(right))
    if isinstance(b, str):
        return Form((left, a, f"{middle}{b}{right}"), len(left) + a.length + len(middle)
                    + len(b) + len(right))
    return Form((left, a, middle, b, right), len(left) + a.length + len(middle) + b.length
                + len(right))


def render(text: Text) -> str:
    """The expression as one string (iterative: a left fold is a million forms deep)."""
    if isinstance(text, str):
        return text
    out: list[str] = []
    stack: list[Text] = [text]
    push, pop, emit = stack.extend, stack.pop, out.append
    while stack:
        item = pop()
        if isinstance(item, str):
            emit(item)
        else:
            push(reversed(item.parts))
    return "".join(out)
