"""Builds the compiled executor's native kernels when the package is installed.

``taskgraph_norm/backends/native/csrc/``: ``native.c`` and ``native_exact.c`` (the forward's float and
exact rows, with ``native_finalize.h``'s FINALIZE) and ``native_sums.c`` (the float chunk sums),
``native_backward.c`` and ``native_dw.c``/``native_dw_fused.c``/``native_dw_round.c`` (the backward, the exact weight
gradient),
``native_narrow.c`` (bf16 and fp16 rows through the forward's fp32 kernels) and ``native_narrow_direct.c``
(those rows without the fp32 scratch),
``native_layer.c`` (LayerNorm's float rows), ``native_layer_exact.c`` (its exact rows),
``native_layer_backward.c`` (its backward), ``native_gate.c`` and ``native_gated.c`` (the gate's
silu, and gated and grouped rows in one pass),
``native_face.c`` and ``native_face_calls.c`` (the functional faces' warm calls checked and run in C),
``native_team.c`` (the team the forward's rows are shared by) and ``native_module.c``
(the extension module: the functions Python calls, each wrapping one entry point)
become two optional extension modules in ``backends/native/``, next to ``loader.py``,
which imports them (setuptools builds every extension with Python's headers, so each
build is a module; there is no other binding):

* ``_native_portable``: the compiler's default target (the baseline every
  machine that runs this Python runs);
* ``_native_host``: ``-march=native`` (``$TGN_NATIVE_MARCH`` overrides the
  target; ``TGN_NATIVE_MARCH=portable`` skips this variant), with the features
  of the CPU that built it embedded, so that ``loader.py`` loads it only on a
  CPU that has all of them (Linux only: elsewhere only the portable variant is
  built).

The values that decide the bits are defined once, in ``taskgraph_norm/constants.py``;
before compiling, this file executes that module on its own (it imports nothing, not
torch) and writes them as ``csrc/tgn_constants.h`` (generated at every build, never
committed), which ``csrc/tgn_native.h`` includes for every C source.

Both are optional: without a working C compiler (``$CC``, else the one Python
was built with) the install still succeeds, and the compiled executor runs its
torch ops with a ``NativeKernelsWarning`` at first use.  Everything else about
the project is in ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import os
import runpy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = "taskgraph_norm/backends/native/csrc"
SOURCES = [f"{CSRC}/{name}.c"
           for name in ("native", "native_exact", "native_exact_f64", "native_sums", "native_tree", "native_backward",
                        "native_dw", "native_dw_measured", "native_dw_direct", "native_dw_fused", "native_dw_round",
                        "native_narrow", "native_narrow_direct", "native_team", "native_team_jobs", "native_layer", "native_layer_exact",
                        "native_layer_backward", "native_gate", "native_gated", "native_face", "native_face_calls",
                        "native_module")]
CONSTANTS = "taskgraph_norm/constants.py"
#: Generated from CONSTANTS by BuildExt (.gitignore'd).
CONSTANTS_HEADER = f"{CSRC}/tgn_constants.h"
DEPENDS = [f"{CSRC}/native_dw.h", f"{CSRC}/native_dw_tile.h", f"{CSRC}/native_exact.h", f"{CSRC}/native_finalize.h",
           f"{CSRC}/native_face.h", f"{CSRC}/native_half.h", f"{CSRC}/native_narrow.h", f"{CSRC}/native_quotient.h",
           f"{CSRC}/native_team.h", f"{CSRC}/native_widen.h", f"{CSRC}/tgn_native.h",
           CONSTANTS_HEADER, CONSTANTS]
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


def constants_header() -> str:
    """``tgn_constants.h``: ``#define TGN_<NAME> <value>`` for every constant of
    ``taskgraph_norm/constants.py`` (each with its docstring), and ``TGN_CONSTANTS(X)``,
    their names, for the table the library exports."""
    path = HERE / CONSTANTS
    values = runpy.run_path(str(path))
    body = ast.parse(path.read_text()).body
    lines = ["/* Generated by setup.py from taskgraph_norm/constants.py, where each value is",
             " * defined: do not edit (every build writes it again). */",
             "#ifndef TGN_CONSTANTS_H", "#define TGN_CONSTANTS_H", "", "#include <stdint.h>", ""]
    names = []
    for node, doc in zip(body, body[1:]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, value = node.target.id, values[node.target.id]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise SystemExit(f"{CONSTANTS}: {name} has no docstring saying what it decides")
        if type(value) is not int:
            raise SystemExit(f"{CONSTANTS}: {name} is not an int (C gets integers only)")
        text = doc.value.value.replace("*/", "* /").splitlines()
        lines += ["/* " + text[0]] + [(" * " + t.strip()).rstrip() for t in text[1:]]
        lines[-1] += " */"
        c_value = f"({value})" if -(1 << 31) <= value < (1 << 31) else f"INT64_C({value})"
        lines += [f"#define TGN_{name} {c_value}", ""]
        names.append(name)
    lines += ["#define TGN_CONSTANTS(X) " + " ".join(f"X({n})" for n in names), "", "#endif", ""]
    return "\n".join(lines)


class BuildExt(build_ext):
    """Writes ``tgn_constants.h`` first; then each extension compiles the sources with
    its own flags, in its own object directory, so the two builds of one source never
    share an object file."""

    def run(self) -> None:
        header, text = HERE / CONSTANTS_HEADER, constants_header()
        if not header.exists() or header.read_text() != text:  # unchanged: no rebuild
            header.write_text(text)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        base, compile_all = self.build_temp, self.compiler.compile
        self.build_temp = os.path.join(base, ext.name.rpartition(".")[2])
        self.compiler.compile = parallel(compile_all)  # type: ignore[method-assign]
        try:
            super().build_extension(ext)
        finally:
            self.build_temp, self.compiler.compile = base, compile_all  # type: ignore[method-assign]


def parallel(compile_all: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """``compile_all`` (a compiler's ``compile``) over each source on its own, the sources
    on as many threads as there are cores: the same commands, the objects in order.  The
    first failure is raised as ``compile_all`` would raise it."""
    def compile_each(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
        with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            parts = list(pool.map(lambda source: compile_all([source], *args, **kwargs), sources))
        return [obj for part in parts for obj in part]
    return compile_each


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
