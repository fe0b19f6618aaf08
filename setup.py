"""Builds the compiled executor's native kernels when the package is installed.

``taskgraph_norm/backends/native/csrc/``: ``native.c`` (the forward's kernels),
``native_backward.c`` and ``native_dw.c`` (the backward, the exact weight gradient),
``native_team.c`` (the team the forward's rows are shared by) and ``native_call.c``
(the forward's call from Python, without ctypes) become two optional extensions in
``backends/native/``, next to ``loader.py``, which loads them with ctypes (plain C
libraries, but for native_call.c's one-function module):

* ``_native_portable``: the compiler's default target (the baseline every
  machine that runs this Python runs);
* ``_native_host``: ``-march=native`` (``$TGN_NATIVE_MARCH`` overrides the
  target; ``TGN_NATIVE_MARCH=portable`` skips this variant), with the features
  of the CPU that built it embedded, so that ``loader.py`` loads it only on a
  CPU that has all of them (Linux only: elsewhere only the portable variant is
  built).

Both are optional: without a working C compiler (``$CC``, else the one Python
was built with) the install still succeeds, and the compiled executor runs its
torch ops with a ``NativeKernelsWarning`` at first use.  Everything else about
the project is in ``pyproject.toml``.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = "taskgraph_norm/backends/native/csrc"
SOURCES = [f"{CSRC}/{name}.c"
           for name in ("native", "native_backward", "native_dw", "native_team", "native_call")]
DEPENDS = [f"{CSRC}/native_quotient.h"]
# Keep the C expressions as written (see native.c): no contraction into fmas, no
# fast-math; -O3 comes after Python's own -O2.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi", "-pthread"]


def extensions() -> list[Extension]:
    common = {"sources": SOURCES, "depends": DEPENDS, "libraries": ["m"], "extra_link_args": ["-pthread"],
              "optional": True}
    exts = [Extension("taskgraph_norm.backends.native._native_portable", extra_compile_args=FLAGS,
                      define_macros=[("TGN_MODULE", "_native_portable")], **common)]
    cpu = runpy.run_path(str(HERE / "taskgraph_norm/backends/native/cpu_features.py"))["features"]()
    march = os.environ.get("TGN_NATIVE_MARCH", "").strip() or "native"
    if cpu and march != "portable":
        exts.append(Extension(
            "taskgraph_norm.backends.native._native_host",
            extra_compile_args=[*FLAGS, f"-march={march}"],
            define_macros=[("TGN_BUILD_CPU", '"' + " ".join(sorted(cpu)) + '"'), ("TGN_MODULE", "_native_host")],
            **common,
        ))
    return exts


class BuildExt(build_ext):
    """Each extension compiles the sources with its own flags: give each its own
    object directory, so the two builds of one source never share an object file."""

    def build_extension(self, ext: Extension) -> None:
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rpartition(".")[2])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
