"""Progress bars for the long commands (``taskgraph-norm report`` and ``bench``, the
benchmark scripts): tqdm on stderr, shown only when stderr is a terminal.

Tables go to stdout and the bar to stderr, so a piped table is byte for byte what it
would be without the bar; under CI, or with stderr redirected, nothing is drawn at all.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Protocol, TextIO

from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar(Protocol):
    """What the commands use of the tqdm bar :func:`progress_bar` returns."""

    def update(self, n: float = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> ProgressBar: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None: ...


def _is_terminal(stream: TextIO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    return callable(isatty) and bool(isatty())


def progress_bar(total: int, desc: str, *, unit: str = "step") -> ProgressBar:
    """A tqdm bar over ``total`` steps on ``sys.stderr`` (looked up at each call, so a
    redirected stderr is honoured), disabled when stderr is not a terminal.

    The bar clears its line when closed (``leave=False``): what stays on the terminal
    is the command's own output.  Use it as a context manager, and close it before
    writing the result, so the result never shares a line with the bar.

    Parameters
    ----------
    total:
        Steps the bar counts to (``bar.update()`` advances one).
    desc:
        The label before the bar.
    unit:
        What a step is (``"round"``, ``"row"``...), shown in the rate.

    Examples
    --------
    >>> with progress_bar(3, "rounds", unit="round") as bar:
    ...     for _ in range(3):
    ...         bar.update()
    """
    stream = sys.stderr
    bar: ProgressBar = tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not _is_terminal(stream),
                            leave=False, dynamic_ncols=True)
    return bar
