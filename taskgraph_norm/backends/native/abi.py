"""The C signatures of the native kernels (``native.c``, ``native_backward.c``,
``native_dw.c``, ``native_team.c``), declared on a loaded library for ctypes, and the
ABI version and constants the loader requires.

The prototypes are ``csrc/tgn_native.h``'s (``tests/test_constants.py`` checks these
declarations against it).  Bump :data:`~taskgraph_norm.constants.NATIVE_ABI` whenever
an entry point's arguments or meaning change, so that a library left from an older
install is never called with the new arguments; a library built from other values of
:mod:`taskgraph_norm.constants` is refused too (:func:`check_constants`).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
from collections.abc import Callable
from pathlib import Path

from ... import constants

__all__ = ["ABI", "RowsConfig", "built_constants", "check_constants", "declare", "rows_entry"]

#: The version ``tgn_native_abi()`` must return.
ABI = constants.NATIVE_ABI


class RowsConfig(ctypes.Structure):
    """``tgn_rows_cfg_t`` (tgn_native.h): one direct-path configuration's constants,
    passed by address to ``tgn_rows_call`` and to native_call.c's ``rows``."""

    _fields_ = [("exact", ctypes.c_int64), ("hidden", ctypes.c_int64), ("chunk", ctypes.c_int64),
                ("adds", ctypes.c_void_p), ("n_adds", ctypes.c_int64), ("root", ctypes.c_int64),
                ("flags", ctypes.c_int64), ("total_flags", ctypes.c_int64), ("offset", ctypes.c_double),
                ("grain", ctypes.c_int64)]


def declare(lib: ctypes.CDLL) -> None:
    """Set ``argtypes``/``restype`` of every entry point on ``lib`` (AttributeError when
    one is missing: not a build of this version)."""
    # y, y_stride, w, eps, flags, offset; then r, r_stride, h, h_stride (the residual)
    finalize_args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double,
                     ctypes.c_int64, ctypes.c_double,
                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    for name in ("tgn_exact_rows_f32", "tgn_exact_rows_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, *finalize_args]
        fn.restype = ctypes.c_int64
    for name in ("tgn_float_rows_f32", "tgn_float_rows_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, *finalize_args]
        fn.restype = ctypes.c_int64
    # cfg, x, y, rows, w, eps, total, r, h, threads
    lib.tgn_rows_call.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int64]
    lib.tgn_rows_call.restype = ctypes.c_int64
    lib.tgn_team_worker_rows.argtypes = []
    lib.tgn_team_worker_rows.restype = ctypes.c_int64
    lib.tgn_team_use_openmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.tgn_team_use_openmp.restype = ctypes.c_int
    lib.tgn_team_openmp.argtypes = []
    lib.tgn_team_openmp.restype = ctypes.c_int
    lib.tgn_backward_rows_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.tgn_backward_rows_f32.restype = ctypes.c_int64
    lib.tgn_backward_rows_f32_team.argtypes = [*lib.tgn_backward_rows_f32.argtypes, ctypes.c_int64, ctypes.c_int64]
    lib.tgn_backward_rows_f32_team.restype = ctypes.c_int64
    lib.tgn_rms_of_totals_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_double, ctypes.c_void_p]
    lib.tgn_rms_of_totals_f32.restype = None
    lib.tgn_exact_dw_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.tgn_exact_dw_f32.restype = ctypes.c_int64
    lib.tgn_exact_dw_rows_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_int64]
    lib.tgn_exact_dw_rows_f32.restype = ctypes.c_int64
    # dy, dy_stride, xh, xh_stride, rms, rows, cols, state, stride, grain, threads
    lib.tgn_exact_dw_f32_team.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.tgn_exact_dw_f32_team.restype = ctypes.c_int64
    lib.tgn_exact_round_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.tgn_exact_round_f32.restype = None
    lib.tgn_exact_scale.argtypes = [ctypes.c_double, ctypes.c_int64,
                                    ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
    lib.tgn_exact_scale.restype = ctypes.c_int


class _Constant(ctypes.Structure):
    """``tgn_constant_t`` (tgn_native.h): one entry of the library's ``tgn_constants``."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_int64)]


def built_constants(lib: ctypes.CDLL) -> dict[str, int]:
    """The values ``lib`` was built with (its ``tgn_constants`` table, by name)."""
    table = ctypes.cast(ctypes.addressof(_Constant.in_dll(lib, "tgn_constants")), ctypes.POINTER(_Constant))
    found: dict[str, int] = {}
    i = 0
    while table[i].name is not None:
        found[table[i].name.decode()] = int(table[i].value)
        i += 1
    return found


def expected_constants() -> dict[str, int]:
    """What a build of this version must report: every constant of
    :mod:`taskgraph_norm.constants`."""
    return {name: value for name, value in vars(constants).items()
            if name.isupper() and type(value) is int}


def check_constants(lib: ctypes.CDLL, path: Path) -> None:
    """Raise OSError when ``lib`` was built from other constants than this package's
    (a stale build: its kernels would give other bits)."""
    built, want = built_constants(lib), expected_constants()
    if built != want:
        differ = sorted(n for n in built.keys() | want.keys() if built.get(n) != want.get(n))
        raise OSError(f"{path} was built from other constants ({', '.join(differ)} differ from "
                      "taskgraph_norm/constants.py): rebuild it (pip install ., or python setup.py build_ext --inplace)")


def rows_entry(lib: ctypes.CDLL, path: Path, name: str) -> Callable[..., int]:
    """native_call.c's ``rows`` from the library ``lib`` loaded from ``path`` (imported
    as the extension module ``name`` it also is), or ``tgn_rows_call`` through ctypes
    where the library has no module (built without Python's headers): the same ten
    arguments either way."""
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, str(path))
        spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
        if spec is None:
            raise ImportError(name)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        rows: Callable[..., int] = module.rows
        return rows
    except (ImportError, AttributeError, OSError):
        return lib.tgn_rows_call
