"""The C signatures of the native kernels (``native.c``, ``native_team.c``), declared
on a loaded library for ctypes, and the ABI version the loader requires.

Bump :data:`ABI` (and ``tgn_native_abi`` in ``native.c``) whenever an entry point's
arguments or meaning change, so that a library left from an older install is never
called with the new arguments.
"""

from __future__ import annotations

import ctypes

__all__ = ["ABI", "declare"]

#: The version ``tgn_native_abi()`` must return.
ABI = 12


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
    for name in ("tgn_float_rows_f32", "tgn_exact_rows_f32"):  # + grain, threads (native_team.c)
        team = getattr(lib, name + "_team")
        team.argtypes = [*getattr(lib, name).argtypes, ctypes.c_int64, ctypes.c_int64]
        team.restype = ctypes.c_int64
    lib.tgn_team_worker_rows.argtypes = []
    lib.tgn_team_worker_rows.restype = ctypes.c_int64
    lib.tgn_team_use_openmp.argtypes = [ctypes.c_void_p]
    lib.tgn_team_use_openmp.restype = ctypes.c_int
    lib.tgn_team_openmp.argtypes = []
    lib.tgn_team_openmp.restype = ctypes.c_int
    lib.tgn_backward_rows_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.tgn_backward_rows_f32.restype = ctypes.c_int64
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
    lib.tgn_exact_round_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.tgn_exact_round_f32.restype = None
    lib.tgn_exact_scale.argtypes = [ctypes.c_double, ctypes.c_int64,
                                    ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
    lib.tgn_exact_scale.restype = ctypes.c_int
