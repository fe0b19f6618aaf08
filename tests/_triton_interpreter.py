"""Triton's interpreter for the tests (the ``interpreted`` fixture of tests/conftest.py).

Under ``TRITON_INTERPRET=1`` a launch patches ``triton.language`` with its numpy
builtins, runs every program, and restores the language.  Triton (3.x) also patches
the language again at every call of a ``@triton.jit`` helper inside a kernel,
although the launch has patched it already: 0.7 ms each on the 2-core VM, half the time
of the Triton tests on CPU.  :func:`skip_repatching` lets a helper called inside a
launch, on the launch's own thread, skip that second patch; every launch still
patches and restores the language itself, so each kernel runs the same numpy
operations as before.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest


def skip_repatching(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patch ``triton.runtime.interpreter._patch_lang`` for the test (no-op where a
    Triton without it is installed: the tests then only run slower)."""
    from triton.runtime import interpreter

    real = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if real is None or scope_type is None:
        return
    launching = threading.local()

    def patch_lang(fn: Any) -> Any:
        if getattr(launching, "depth", 0):
            return scope_type()  # a helper inside this thread's launch: the language is patched
        scope = real(fn)
        launching.depth = 1
        restore = scope.restore

        def restore_and_end() -> None:
            launching.depth = 0
            restore()

        scope.restore = restore_and_end
        return scope

    monkeypatch.setattr(interpreter, "_patch_lang", patch_lang)
