"""The compiled executor's native kernels: whole rows of sums of squares, in C.

``native_exact.c`` and ``native.c`` hold two kernels, each the C form of torch ops the compiled
executor would otherwise run, computed row by row while the row is in cache:

* :func:`exact_rows`: what :func:`kernels.rowmax_sq_whole`,
  :func:`kernels.exact_scale` and :func:`kernels.sumsq_exact` compute (the torch
  ops make about ten passes over an fp64 tile).  Every addition of the exact
  domain is exact, so its sums are the same in any order and the native pair
  ``(S1, S2)`` is bit-identical to the torch ops' pair.
* :func:`float_rows`: a plan's pairwise leaves (the halving order of
  :func:`kernels.pairwise_halving_`) and its ordered ADD merges, operation for
  operation in the plan's order.

``tests/test_native.py`` checks both against the torch ops and the reference
interpreter, edge cases included.

The kernels are built when the package is installed (``setup.py``: two optional
extension modules next to this file, ``_native_portable`` for the compiler's default
target and ``_native_host`` for ``-march=native``) and imported from this file's
own directory, never from a cache or a path taken from the environment; the module's
functions (``csrc/native_module.c``, :mod:`.abi`) are the only way in.  The
host build carries the features of the CPU that built it, read from the file
before it is loaded: it is loaded only on a CPU that has all of them, else the
portable one is (``TGN_NATIVE=portable`` asks for the portable one).  A library
that is missing or fails to load leaves the compiled executor on its torch ops
(the same bits, slower), with one :class:`~taskgraph_norm.errors.NativeKernelsWarning`
per process that says why and what it costs (so does a host build that cannot be
used); ``TGN_NATIVE=0`` chooses the torch ops silently, ``TGN_NATIVE=portable``
the portable build.
docs/reliability.md has the whole story.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import functools
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ... import caches
from ..base import allowed as _allowed
from ..base import use as _use
from ...constants import ROUND_F16, ROUND_PRODUCT, ROUND_QUOTIENT, TOTAL_AS_RMS, TOTAL_ROUNDED  # FINALIZE's flags
from ...errors import NativeKernelsWarning
from . import abi as native_abi
from . import cpu_features
from ...lowering import Plan

__all__ = [
    "available", "describe", "disabled", "exact_rows",
    "exact_scale", "float_rows", "FloatRecipe", "library_path", "module",
    "why_unavailable", "ROUND_F16", "ROUND_PRODUCT", "ROUND_QUOTIENT", "TOTAL_AS_RMS", "TOTAL_ROUNDED",
]

_DIR = Path(__file__).resolve().parent
#: What the torch ops cost instead (docs/performance.md, "On torch ops alone").
_COST = ("the same bits, about 2x to 3.5x slower for float plans and 3x to 4.5x for exact ones on (4096, 4096) fp32 "
         "(docs/reliability.md)")
#: What the portable build costs instead of the host one (docs/reliability.md).
_PORTABLE_COST = ("the same bits; the float kernel about 1.35x slower, the exact one about 3x "
                  "(docs/reliability.md)")

_lock = threading.Lock()
_module: Any = None  # the extension module (abi.import_module), or None
_path: Path | None = None
_error: str | None = None
_note: str | None = None  # why the host build is not the one loaded, if it is not
_loaded = False
_choice = os.environ.get("TGN_NATIVE", "1").strip().lower()
#: ``TGN_NATIVE=0`` (read once at import) turns the kernels off for the process.
_env_enabled = _choice not in ("0", "false", "no", "off")


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _find(variant: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _DIR / f"_native_{variant}{suffix}"
        if os.path.lexists(path):
            return path
    return None


def _trusted(path: Path) -> Path:
    """The real path of ``path``, if it may be loaded: a regular file owned by root,
    this user or loader.py's owner, neither it nor its folder writable by others."""
    real = Path(os.path.realpath(path))
    st = os.lstat(real)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{real} is not a regular file")
    if st.st_uid not in (0, os.geteuid(), os.stat(__file__).st_uid):
        raise OSError(f"{real} is owned by user {st.st_uid}, not by this user, root or the package's owner")
    for where, mode in ((real, st.st_mode), (real.parent, os.stat(real.parent).st_mode)):
        if mode & stat.S_IWOTH:
            raise OSError(f"{where} is writable by every user: no code is loaded from it")
    return real


def _host_misfit(path: Path) -> str | None:
    """``None`` when this CPU has every feature the host build was made for; else why
    not.  Reads the file only: no code of a build made for another CPU runs."""
    built = cpu_features.parse_marker(path.read_bytes())
    here = cpu_features.features()
    if built is None:  # setup.py always writes it: this file is not what it built
        raise OSError("it does not say which CPU built it (not a build of setup.py's)")
    if here is None:
        return "this machine does not say which CPU features it has"
    missing = sorted(built - here)
    if missing:
        return f"it was built on a CPU with {', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}, which this one lacks"
    return None


def _open(path: Path) -> Any:
    """The extension module at ``path``, imported once ``path`` is :func:`_trusted` and
    checked (:func:`.abi.import_module`)."""
    return native_abi.import_module(_trusted(path), f"{__package__}.{path.name.split('.')[0]}")


def _choose() -> tuple[Any, Path | None, list[str]]:
    """The module of the best build this CPU can run, its path, and why any build
    that is there was not loaded."""
    reasons: list[str] = []
    for variant in ("portable",) if _choice == "portable" else ("host", "portable"):
        path = _find(variant)
        if path is None:
            continue
        try:
            if variant == "host" and (misfit := _host_misfit(path)) is not None:
                reasons.append(f"host build not used: {misfit}")
                continue
            return _open(path), path, reasons
        except (OSError, ImportError, AttributeError) as exc:  # unreadable, untrusted, not a module, stale
            reasons.append(f"{path.name} failed to load: {exc}")
    if _find("portable") is None:
        reasons.append(f"not built: no _native_portable library in {_DIR}; they are built when the package "
                       "is installed, with a C compiler (in a source checkout: `python setup.py build_ext "
                       "--inplace`)")
    return None, None, reasons


def _load() -> Any:
    global _module, _path, _error, _note, _loaded
    if _loaded:  # the fast path of every call after the first
        return _module
    with _lock:
        if _loaded:
            return _module
        _module, _path, reasons = _choose()
        _error = None if _module is not None else "; ".join(reasons)
        _note = "; ".join(reasons) if _module is not None and reasons else None
        # Set last: the lock-free fast path above must never see a half-made state.
        _loaded = True
    # Only the thread that loaded gets here: one warning per process.
    if _module is None:
        warnings.warn(f"taskgraph_norm's native kernels are unavailable ({_error}). The compiled executor runs "
                      f"its torch ops instead: {_COST}. Reinstall taskgraph-norm where a C compiler works, or "
                      "set TGN_NATIVE=0 to choose the torch ops without this warning.",
                      NativeKernelsWarning, stacklevel=3)
    elif _note is not None:
        warnings.warn(f"taskgraph_norm's native kernels: {_note}; running the portable build instead: "
                      f"{_PORTABLE_COST}. Reinstall taskgraph-norm on this machine to rebuild it, or set "
                      "TGN_NATIVE=portable to choose the portable build without this warning.",
                      NativeKernelsWarning, stacklevel=3)
    return _module


def available() -> bool:
    """Whether the native kernels are installed, loadable and enabled (loads them on
    the first call; a :class:`NativeKernelsWarning` says why when they are not)."""
    return enabled() and _load() is not None


#: Float merges the native float kernels run (a ``cat`` merge and ``native`` leaves
#: keep ``torch.sum``'s own order, so they stay on torch ops).
FLOAT_MERGES = ("single", "tree", "adds")


def runs_plan(plan: Plan) -> bool:
    """Whether the native kernels have a form for ``plan``: every exact plan, and float
    plans with pairwise leaves and ADD merges (the one answer every caller reads)."""
    return plan.accumulate == "exact" or (plan.leaf == "pairwise" and plan.merge in FLOAT_MERGES)


def enabled() -> bool:
    """Whether the native kernels may be used now, in this context (not ``TGN_NATIVE=0``,
    not inside :func:`disabled` or a ``backends.use`` without ``"native"``); says nothing
    of whether they are built."""
    return _env_enabled and "native" in _allowed()


def why_unavailable() -> str | None:
    """``None`` when :func:`available`; else the reason, in words."""
    if not enabled():
        return "disabled (TGN_NATIVE=0, native.disabled() or backends.use() without 'native')"
    if _load() is None:
        return _error
    return None


def library_path() -> Path | None:
    """The library that is loaded (next to this file); ``None`` when none is."""
    return _path if enabled() and _load() is not None else None


def describe(on: bool = True) -> str:
    """Which kernels the compiled executor runs here, and why, in words (report and
    bench headers); ``on=False`` describes a run made inside :func:`disabled`."""
    if not on or not enabled():
        return "compiled executor kernels: torch ops (native kernels off for this run)"
    if available():
        assert _path is not None
        build = ("host build, -march=native for this CPU" if _path.name.startswith("_native_host")
                 else f"portable build{'; ' + _note if _note else ''}")
        return f"compiled executor kernels: native C (backends/native/csrc/native.c, {build})"
    return f"compiled executor kernels: torch ops (native kernels unavailable: {why_unavailable()})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the plans on torch ops inside this block (this thread or task, and the work it
    hands to others): ``backends.use`` without ``"native"``, for tests and benchmarks."""
    others = tuple(name for name in _allowed() if name != "native") or ("torch_ops",)
    with _use(*others):
        yield



#: The dtypes the C kernel reads directly; fp16 and bf16 are widened to fp32 first.
_FUNCS = {torch.float32: "exact_rows_f32", torch.float64: "exact_rows_f64"}


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype not in _FUNCS or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError("the native kernels need a 2-D CPU float32/float64 tensor with unit stride along rows")


def module() -> Any:
    """The loaded extension module (``csrc/native_module.c``: one function per entry
    point of ``tgn_native.h``, named without ``tgn_``); RuntimeError when the kernels
    are unavailable."""
    loaded = _load()
    if loaded is None:
        raise RuntimeError(f"the native kernel is unavailable: {_error}")
    return loaded


def _finalize_args(
    x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None, eps: float, check: bool,
    flags: int = 0, offset: float = 0.0,
) -> tuple[int | None, int, int | None, float, int, float]:
    """``(y, y_stride, w, eps, flags, offset)`` for a kernel's fused FINALIZE
    (``y=None``: none), checked against ``x`` unless ``check`` is false."""
    if y is None:
        return None, 0, None, 0.0, 0, 0.0
    if not check:
        return (y.data_ptr(), y.stride(0), None if weight is None else weight.data_ptr(), float(eps),
                flags, float(offset))
    if x.dtype != torch.float32:
        raise ValueError("the fused FINALIZE is for float32 rows only: torch's CPU fp64 sqrt is not "
                         "correctly rounded, so an IEEE one in C would not give torch's bits")
    _check_like(x, y, "y")
    if weight is not None and (
        weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous()
    ):
        raise ValueError("weight must be a contiguous (hidden,) tensor of x's dtype")
    return y.data_ptr(), y.stride(0), None if weight is None else weight.data_ptr(), float(eps), flags, float(offset)


def _check_like(x: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if t.shape != x.shape or t.dtype != x.dtype or t.device.type != "cpu" or (
        x.shape[1] > 1 and t.stride(1) != 1
    ):
        raise ValueError(f"{name} must be a CPU tensor of x's shape and dtype with unit stride along rows")


def _residual_args(
    x: torch.Tensor, residual: torch.Tensor | None, h: torch.Tensor | None, check: bool
) -> tuple[int | None, int, int | None, int]:
    """``(r, r_stride, h, h_stride)`` for a kernel's fused residual add (none without ``residual``)."""
    if residual is None:
        return None, 0, None, 0
    if h is None:
        raise ValueError("a residual needs h, the tensor h = x + residual is written into")
    if check:
        _check_like(x, residual, "residual")
        _check_like(x, h, "h")
    return residual.data_ptr(), residual.stride(0), h.data_ptr(), h.stride(0)


def exact_rows(
    x: torch.Tensor, pair: torch.Tensor, y: torch.Tensor | None = None,
    weight: torch.Tensor | None = None, eps: float = 0.0, *, check: bool = True,
    flags: int = 0, offset: float = 0.0, residual: torch.Tensor | None = None, h: torch.Tensor | None = None,
) -> int:
    """Write each row's exact pair ``(S1, S2)`` of ``x`` (2-D, CPU) into ``pair``.

    ``x`` must be float32 or float64 with a unit stride along the row; ``pair`` a
    contiguous ``(rows, 2)`` float64 tensor.  Rows with no scale (Inf, or an fp64
    bound past ``2**1023``) or with a NaN get ``NaN`` pairs; their count is
    returned.  With ``y`` (x's shape and dtype; may be ``x`` itself), FINALIZE
    follows row by row: ``y = x / sqrt((S1 + S2) / D + eps) * weight``, as
    :func:`kernels.finalize` computes it in ``x``'s dtype (rows with NaN pairs get
    garbage there, for the caller to replace).  ``check=False`` skips the argument
    checks (the compiled executor, whose buffers are right by construction).
    ``offset`` is added to the weight and ``flags`` (:data:`ROUND_QUOTIENT`,
    :data:`ROUND_PRODUCT`, :data:`ROUND_F16`) round as ``casting_mode="llama"`` does on
    bf16 or fp16 rows (a NaN met there makes the row's pair NaN, for the caller to redo).  With
    ``residual`` (x's shape and dtype), each row is first replaced by
    ``h = x + residual``, written into ``h`` (which may be ``x`` or ``residual``).
    """
    lib = module()
    rows, hidden = x.shape
    if check:
        _check_rows(x)
        if pair.shape != (rows, 2) or pair.dtype != torch.float64 or not pair.is_contiguous():
            raise ValueError("pair must be a contiguous (rows, 2) float64 tensor")
    fin = _finalize_args(x, y, weight, eps, check, flags, offset)
    res = _residual_args(x, residual, h, check)
    if rows == 0:
        return 0
    fn = getattr(lib, _FUNCS[x.dtype])
    return int(fn(x.data_ptr(), rows, hidden, x.stride(0), pair.data_ptr(), *fin, *res))


def exact_scale(row_max: float, hidden_size: int) -> tuple[float, float]:
    """The C form of :func:`kernels.exact_scale` for one row (for tests)."""
    s1, s2 = module().exact_scale(float(row_max), hidden_size)
    return float(s1), float(s2)


class FloatRecipe:
    """What :func:`float_rows` needs of a float plan: chunk size, ADD triples, root.

    ``adds`` is the plan's ``(dst, a, b)`` slot triples in level order (slots
    ``0..n-1`` are the chunks' leaves), flattened into an int64 tensor once.
    """

    def __init__(self, chunk_size: int, n_chunks: int, adds: tuple[tuple[int, int, int], ...], root: int) -> None:
        slots = n_chunks + len(adds)
        if not all(0 <= i < slots for t in adds for i in t) or not 0 <= root < slots or chunk_size < 1:
            raise ValueError("the ADD triples and root must name slots 0..n_chunks + len(adds) - 1")
        self.chunk_size, self.n_chunks, self.root = chunk_size, n_chunks, root
        self.n_adds = len(adds)
        self.adds = torch.tensor([i for t in adds for i in t] or [0], dtype=torch.int64)


def float_rows(
    x: torch.Tensor, recipe: FloatRecipe, total: torch.Tensor, y: torch.Tensor | None = None,
    weight: torch.Tensor | None = None, eps: float = 0.0, *, check: bool = True,
    flags: int = 0, offset: float = 0.0, residual: torch.Tensor | None = None, h: torch.Tensor | None = None,
) -> int:
    """Write each row's float sum of squares of ``x`` into ``total`` (``(rows, 1)``,
    contiguous, ``x``'s dtype): pairwise leaves, then the recipe's ADDs in order.
    With ``y``, FINALIZE follows row by row, and ``residual`` is added first, as in
    :func:`exact_rows` (a NaN the llama rounding meets makes the row's total NaN).

    Returns the number of rows whose total is NaN: their NaN's sign and payload
    are C's, not necessarily torch's, so the caller recomputes them.
    """
    lib = module()
    rows, hidden = x.shape
    if check:
        _check_rows(x)
        if total.shape != (rows, 1) or total.dtype != x.dtype or not total.is_contiguous():
            raise ValueError("total must be a contiguous (rows, 1) tensor of x's dtype")
        if -(-hidden // recipe.chunk_size) != recipe.n_chunks:
            raise ValueError(f"the recipe has {recipe.n_chunks} chunks; x's rows make {-(-hidden // recipe.chunk_size)}")
    fin = _finalize_args(x, y, weight, eps, check, flags, offset)
    res = _residual_args(x, residual, h, check)
    if rows == 0:
        return 0
    fn = lib.float_rows_f32 if x.dtype == torch.float32 else lib.float_rows_f64
    nan_rows = int(fn(x.data_ptr(), rows, hidden, x.stride(0), recipe.chunk_size, recipe.adds.data_ptr(),
                      recipe.n_adds, recipe.root, total.data_ptr(), *fin, *res))
    if nan_rows < 0:
        raise MemoryError("the native float kernel could not allocate its scratch")
    return nan_rows
