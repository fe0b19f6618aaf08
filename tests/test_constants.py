"""Each constant that decides the bits is defined once (taskgraph_norm/constants.py).

The C sources read them from ``tgn_constants.h``, which setup.py writes from that
module; the built libraries export the values they were built with, and the loader
refuses one whose values differ.  No other file may define one of these names with a
literal, and the C functions' prototypes are written once, in ``tgn_native.h``, which
the extension module's functions (``native_module.c``) must match.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from taskgraph_norm import constants
from taskgraph_norm.backends.native import abi
from taskgraph_norm.backends.native import loader as native

PACKAGE = Path(__file__).resolve().parents[1] / "taskgraph_norm"
CSRC = PACKAGE / "backends" / "native" / "csrc"

#: Names the values had before they moved here, or have as local aliases: none may be
#: defined with a literal outside constants.py either.
OLD_NAMES = {"ABI", "ROW_BLOCK", "DW_BLOCK", "DW_TILE", "DW_DIGITS", "DW_BASE", "DW_L", "DW_SMIN",
             "DW_TOP_LIMIT", "DW_MAX_FOLDS", "SMIN", "MAX_FOLDS", "FOLD_L", "DIGITS", "DIGIT_BITS",
             "BASE_EXPONENT", "TOP_LIMIT", "_TILE", "TGN_ROUND_QUOTIENT", "TGN_ROUND_PRODUCT",
             "TGN_TOTAL_AS_RMS"}


def _names() -> set[str]:
    names = set(abi.expected_constants())
    return names | {f"TGN_{n}" for n in names} | OLD_NAMES


# --- the module ----------------------------------------------------------------------


def test_the_constants_module_imports_nothing_and_documents_each_value() -> None:
    body = ast.parse((PACKAGE / "constants.py").read_text()).body
    imports = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert {n.module for n in imports if isinstance(n, ast.ImportFrom)} <= {"__future__", "typing"}
    assert not [n for n in imports if isinstance(n, ast.Import)]
    assigned = [(node, doc) for node, doc in zip(body, body[1:]) if isinstance(node, ast.AnnAssign)]
    assert {node.target.id for node, _ in assigned if isinstance(node.target, ast.Name)} == set(
        abi.expected_constants())
    for node, doc in assigned:
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), ast.unparse(node)
        assert len(str(doc.value.value)) > 40, ast.unparse(node)  # says what it decides


def test_the_modules_that_used_to_define_them_read_them() -> None:
    from taskgraph_norm import kernels, topologies
    from taskgraph_norm.backends.native import direct
    from taskgraph_norm.backends.triton import exact_dw
    from taskgraph_norm.kernels import exact_sum
    from taskgraph_norm.backends import registry
    from taskgraph_norm.ops import exact_grad

    assert kernels.ROW_BLOCK == topologies.ROW_BLOCK == constants.BACKWARD_ROW_BLOCK
    assert direct.SPLIT_NUMEL == registry.SPLIT_NUMEL == constants.SPLIT_NUMEL
    assert direct.TEAM_GRAIN == constants.TEAM_GRAIN
    assert registry.SPLIT_PRODUCTS == constants.SPLIT_PRODUCTS
    assert (exact_sum.DIGITS, exact_sum.BASE_EXPONENT, exact_sum.DIGIT_BITS, exact_sum.TOP_LIMIT) == (
        constants.EXACT_DIGITS, constants.EXACT_BASE_EXPONENT, constants.EXACT_DIGIT_BITS, constants.EXACT_TOP_LIMIT)
    assert (exact_dw.ROW_BLOCK, exact_dw.FOLD_L, exact_dw.MAX_FOLDS, exact_dw.SMIN) == (
        constants.EXACT_DW_ROW_BLOCK, constants.EXACT_DW_FOLD_L, constants.EXACT_DW_MAX_FOLDS,
        constants.EXACT_DW_MIN_SCALE)
    assert abi.ABI == constants.NATIVE_ABI


# --- no second definition ------------------------------------------------------------

_PY_DEF = r"^\s*({names})\s*(?::[^=\n]*)?=\s*[-+(]*\d"
_C_DEF = r"^\s*#\s*define\s+({names})\s+[-+(]*\d|\b({names})\s*=\s*[-+(]*\d"


def literal_definitions(root: Path, names: set[str], skip: set[Path]) -> list[str]:
    """``file:line: text`` of each line under ``root`` that gives one of ``names`` a
    numeric literal (Python ``NAME = 32``, ``NAME: T = 32``; C ``#define NAME 32``,
    ``NAME = 32`` in an enum or an initialiser)."""
    alternatives = "|".join(sorted(map(re.escape, names)))
    py, c = re.compile(_PY_DEF.format(names=alternatives)), re.compile(_C_DEF.format(names=alternatives))
    found = []
    for path in sorted(root.rglob("*")):
        if path in skip or path.suffix not in (".py", ".c", ".h") or "__pycache__" in path.parts:
            continue
        pattern = py if path.suffix == ".py" else c
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(root.parent)}:{i}: {line.strip()}")
    return found


def test_no_other_file_defines_them_with_a_literal() -> None:
    skip = {PACKAGE / "constants.py", CSRC / "tgn_constants.h"}
    found = literal_definitions(PACKAGE, _names(), skip)
    assert not found, "defined again (import it from taskgraph_norm.constants):\n" + "\n".join(found)


def test_a_second_definition_is_caught(tmp_path: Path) -> None:
    # Negative control: the same scan finds each way of writing one again.
    pkg = tmp_path / "taskgraph_norm"
    pkg.mkdir()
    (pkg / "a.py").write_text("ROW_BLOCK = 32\nSPLIT_NUMEL: Final = 1 << 16\nx = ROW_BLOCK\n")
    (pkg / "b.c").write_text("#define DW_TILE 32\nenum { TGN_EXACT_DIGITS = 19 };\nint y = DW_TILE;\n")
    (pkg / "c.h").write_text("#define DW_BLOCK TGN_EXACT_DW_ROW_BLOCK\n")  # an alias: allowed
    found = literal_definitions(pkg, _names(), set())
    assert [f.split(": ")[0] for f in found] == ["taskgraph_norm/a.py:1", "taskgraph_norm/a.py:2",
                                                 "taskgraph_norm/b.c:1", "taskgraph_norm/b.c:2"]


# --- the built modules -----------------------------------------------------------------


def _built() -> list[Path]:
    return [p for p in (native._find(v) for v in ("host", "portable")) if p is not None]


def _import(path: Path) -> object:
    return abi.import_module(path, f"taskgraph_norm.backends.native.{path.name.split('.')[0]}")


@pytest.mark.skipif(not _built(), reason="the native kernels are not built here")
@pytest.mark.parametrize("path", _built(), ids=lambda p: p.name.split(".")[0])
def test_the_built_kernels_have_the_python_values(path: Path) -> None:
    module: Any = _import(path)  # checks both, and raises if either differs
    assert module.constants() == abi.expected_constants()
    assert module.native_abi() == constants.NATIVE_ABI
    abi.check_constants(module, path)


@pytest.mark.skipif(not _built(), reason="the native kernels are not built here")
def test_a_build_from_other_values_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Negative control: the package's value changes, the build's does not.
    path = _built()[0]
    module = _import(path)
    monkeypatch.setattr(constants, "BACKWARD_ROW_BLOCK", constants.BACKWARD_ROW_BLOCK + 1)
    with pytest.raises(OSError, match="BACKWARD_ROW_BLOCK differ"):
        abi.check_constants(module, path)
    with pytest.raises(OSError, match="BACKWARD_ROW_BLOCK differ"):
        _import(path)


# --- one set of prototypes ---------------------------------------------------------------

_PROTOTYPE = re.compile(r"^(int64_t|int|void|double)\s+(tgn_\w+)\s*\(([^;{)]*)\)\s*;", re.M)
#: Pointer parameters a wrapper returns instead of taking (exact_scale's two scales).
_RETURNED = {"tgn_exact_scale": ("sigma1", "sigma2")}


def header_prototypes() -> dict[str, list[str]]:
    """``name: parameter names`` of every function ``tgn_native.h`` declares."""
    found: dict[str, list[str]] = {}
    for _, name, params in _PROTOTYPE.findall((CSRC / "tgn_native.h").read_text()):
        names = [p.split()[-1].lstrip("*") for p in " ".join(params.split()).split(",")
                 if p.strip() not in ("void", "")]
        found[name] = names
    return found


def module_functions(module: Any) -> dict[str, list[str]]:
    """``tgn_<name>: parameter names`` of each of the module's functions that wraps an
    entry point (all but rows_config and constants, which wrap a struct and a table, and
    the C faces' four, which take Python objects: tests/test_layer_face.py, test_rms_face.py)."""
    found: dict[str, list[str]] = {}
    for name in dir(module):
        fn = getattr(module, name)
        if name.startswith("_") or not callable(fn) or name in ("rows_config", "constants", "face_setup",
                                                                 "layer_face_config", "layer_face", "rms_face"):
            continue
        found[f"tgn_{name}"] = list(inspect.signature(fn).parameters)
    return found


@pytest.mark.skipif(not _built(), reason="the native kernels are not built here")
def test_the_module_functions_match_the_header() -> None:
    """Each of the module's functions has its entry point's parameters, by name and in
    order (the C compiler checks each wrapper's call against the prototype), and
    converts exactly that many arguments (one more is refused before any C runs)."""
    header = header_prototypes()
    assert len(header) >= 15  # the reader sees them
    for path in _built():
        module: Any = _import(path)
        functions = module_functions(module)
        assert len(functions) >= 14
        for name, params in functions.items():
            assert name in header, f"{path.name}: {name[4:]} wraps nothing tgn_native.h declares"
            want = [p for p in header[name] if p not in _RETURNED.get(name, ())]
            assert params == want, name
            if params:
                with pytest.raises(TypeError, match=f"takes {len(params)} arguments"):
                    getattr(module, name[4:])(*[None] * (len(params) + 1))


def test_a_signature_that_differs_from_the_header_is_caught() -> None:
    # Negative control: the reader and the comparison see a wrapper that drifted.
    header = header_prototypes()

    class Drifted:
        @staticmethod
        def exact_round_f32(state: int, n: int, to_odd: int, out: int) -> int:  # stride left out
            return 0

    functions = module_functions(Drifted)
    assert functions["tgn_exact_round_f32"] != header["tgn_exact_round_f32"]


def test_every_c_file_takes_its_prototypes_from_the_header() -> None:
    header = set(header_prototypes())
    for path in sorted(CSRC.glob("*.c")):
        text = path.read_text()
        assert '#include "tgn_native.h"' in text, path.name
        copied = [name for _, name, _ in _PROTOTYPE.findall(text) if name in header]
        assert not copied, f"{path.name} declares {copied} again: they are tgn_native.h's"
