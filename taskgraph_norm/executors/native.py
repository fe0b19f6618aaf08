"""The compiled executor's native kernels: whole rows of sums of squares, in C.

``native.c`` holds two kernels, each the C form of torch ops the compiled
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

The library is built on first use with the system C compiler (``$CC``, else
``cc``) and cached, keyed by the source, the compiler and the CPU, in
``$TGN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/taskgraph_norm`` or
``~/.cache/taskgraph_norm``).  With no compiler, or with ``TGN_NATIVE=0``, the
compiled executor uses its torch ops instead: the same bits, slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "available", "describe", "disabled", "exact_dw", "exact_rows", "exact_scale", "float_rows", "FloatRecipe", "library_path",
    "why_unavailable",
]

_SOURCE = Path(__file__).with_name("native.c")
_ABI = 5
#: The flags that keep the C expressions as written (see native.c).  The target is
#: this CPU (``$TGN_NATIVE_MARCH`` overrides it, e.g. ``x86-64`` for the portable
#: vector code, which the tests check too).
_FLAGS = ["-O3", f"-march={os.environ.get('TGN_NATIVE_MARCH') or 'native'}", "-ffp-contract=off",
          "-fno-fast-math", "-Wno-psabi", "-fPIC", "-shared"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_loaded = False
_enabled = os.environ.get("TGN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    explicit = os.environ.get("TGN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskgraph_norm"


def _cpu_signature() -> str:
    # -march=native makes the library specific to this CPU: key it by the CPU's flags.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def library_path() -> Path | None:
    """Where the compiled library is (or would be) cached; ``None`` with no compiler."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), cc, version, " ".join(_FLAGS), _cpu_signature(),
                   platform.machine(), sys.platform]).encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"native-{key}.so"


def _build(target: Path, cc: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load half a file.
    fd, tmp = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _error, _loaded
    if _loaded:  # the fast path of every call after the first
        return _lib
    with _lock:
        if _loaded:
            return _lib
        try:
            cc = _compiler()
            path = library_path()
            if cc is None or path is None:
                raise OSError("no C compiler found (set $CC, or install gcc or clang)")
            if not path.exists():
                _build(path, cc)
            lib = ctypes.CDLL(str(path))
            if lib.tgn_native_abi() != _ABI:
                raise OSError(f"{path} is a stale build (ABI {lib.tgn_native_abi()}, want {_ABI})")
            finalize_args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double]
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
            lib.tgn_exact_dw_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
            lib.tgn_exact_dw_f32.restype = ctypes.c_int64
            lib.tgn_exact_scale.argtypes = [ctypes.c_double, ctypes.c_int64,
                                            ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
            lib.tgn_exact_scale.restype = ctypes.c_int
            _lib = lib
        except (OSError, AttributeError, subprocess.SubprocessError) as exc:
            # no compiler, a failed or timed-out build, an unloadable file, a missing symbol
            _error = str(exc)
            _lib = None
        # Set last: the lock-free fast path above must never see a half-made state.
        _loaded = True
        return _lib


def available() -> bool:
    """Whether the native kernel is built and enabled (builds it on first call)."""
    return _enabled and _load() is not None


def enabled() -> bool:
    """Whether the native kernels may be used now (not ``TGN_NATIVE=0``, not inside
    :func:`disabled`); says nothing of whether they are built."""
    return _enabled


def why_unavailable() -> str | None:
    """``None`` when :func:`available`; else the reason, in words."""
    if not _enabled:
        return "disabled (TGN_NATIVE=0 or native.disabled())"
    if _load() is None:
        return _error
    return None


def describe(enabled: bool = True) -> str:
    """Which kernels the compiled executor runs here, in words (report and bench
    headers); ``enabled=False`` describes a run made inside :func:`disabled`."""
    if not enabled or not _enabled:
        return "compiled executor kernels: torch ops (native kernels off for this run)"
    if available():
        return "compiled executor kernels: native C (executors/native.c, built with the system compiler)"
    return f"compiled executor kernels: torch ops (native kernels unavailable: {why_unavailable()})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the compiled executor on its torch ops inside this block (tests, benchmarks)."""
    global _enabled
    before = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = before


#: The dtypes the C kernel reads directly; fp16 and bf16 are widened to fp32 first.
_FUNCS = {torch.float32: "tgn_exact_rows_f32", torch.float64: "tgn_exact_rows_f64"}


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype not in _FUNCS or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError("the native kernels need a 2-D CPU float32/float64 tensor with unit stride along rows")


def _library() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native kernel is unavailable: {_error}")
    return lib


def _finalize_args(
    x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None, eps: float, check: bool
) -> tuple[int | None, int, int | None, float]:
    """``(y, y_stride, w, eps)`` for a kernel's fused FINALIZE (``y=None``: none),
    checked against ``x`` unless ``check`` is false."""
    if y is None:
        return None, 0, None, 0.0
    if not check:
        return y.data_ptr(), y.stride(0), None if weight is None else weight.data_ptr(), float(eps)
    if x.dtype != torch.float32:
        raise ValueError("the fused FINALIZE is for float32 rows only: torch's CPU fp64 sqrt is not "
                         "correctly rounded, so an IEEE one in C would not give torch's bits")
    if y.shape != x.shape or y.dtype != x.dtype or y.device.type != "cpu" or (
        x.shape[1] > 1 and y.stride(1) != 1
    ):
        raise ValueError("y must be a CPU tensor of x's shape and dtype with unit stride along rows")
    if weight is not None and (
        weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous()
    ):
        raise ValueError("weight must be a contiguous (hidden,) tensor of x's dtype")
    return y.data_ptr(), y.stride(0), None if weight is None else weight.data_ptr(), float(eps)


def exact_rows(
    x: torch.Tensor, pair: torch.Tensor, y: torch.Tensor | None = None,
    weight: torch.Tensor | None = None, eps: float = 0.0, *, check: bool = True,
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
    """
    lib = _library()
    rows, hidden = x.shape
    if check:
        _check_rows(x)
        if pair.shape != (rows, 2) or pair.dtype != torch.float64 or not pair.is_contiguous():
            raise ValueError("pair must be a contiguous (rows, 2) float64 tensor")
    fin = _finalize_args(x, y, weight, eps, check)
    if rows == 0:
        return 0
    fn = getattr(lib, _FUNCS[x.dtype])
    return int(fn(x.data_ptr(), rows, hidden, x.stride(0), pair.data_ptr(), *fin))


def exact_scale(row_max: float, hidden_size: int) -> tuple[float, float]:
    """The C form of :func:`kernels.exact_scale` for one row (for tests)."""
    lib = _library()
    s1, s2 = ctypes.c_double(), ctypes.c_double()
    lib.tgn_exact_scale(row_max, hidden_size, ctypes.byref(s1), ctypes.byref(s2))
    return s1.value, s2.value


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
) -> int:
    """Write each row's float sum of squares of ``x`` into ``total`` (``(rows, 1)``,
    contiguous, ``x``'s dtype): pairwise leaves, then the recipe's ADDs in order.
    With ``y``, FINALIZE follows row by row, as in :func:`exact_rows`.

    Returns the number of rows whose total is NaN: their NaN's sign and payload
    are C's, not necessarily torch's, so the caller recomputes them.
    """
    lib = _library()
    rows, hidden = x.shape
    if check:
        _check_rows(x)
        if total.shape != (rows, 1) or total.dtype != x.dtype or not total.is_contiguous():
            raise ValueError("total must be a contiguous (rows, 1) tensor of x's dtype")
        if -(-hidden // recipe.chunk_size) != recipe.n_chunks:
            raise ValueError(f"the recipe has {recipe.n_chunks} chunks; x's rows make {-(-hidden // recipe.chunk_size)}")
    fin = _finalize_args(x, y, weight, eps, check)
    if rows == 0:
        return 0
    fn = lib.tgn_float_rows_f32 if x.dtype == torch.float32 else lib.tgn_float_rows_f64
    nan_rows = int(fn(x.data_ptr(), rows, hidden, x.stride(0), recipe.chunk_size, recipe.adds.data_ptr(),
                      recipe.n_adds, recipe.root, total.data_ptr(), *fin))
    if nan_rows < 0:
        raise MemoryError("the native float kernel could not allocate its scratch")
    return nan_rows


def exact_dw(state: torch.Tensor, dy: torch.Tensor, x_hat: torch.Tensor, columns: tuple[int, int] | None = None) -> int:
    """``state += sum over rows of dy * x_hat``, exactly, for columns ``[c0, c1)``.

    The C route to :func:`kernels.exact_sum.add_products_` (the same state, bit for
    bit): ``dy`` and ``x_hat`` are 2-D CPU float32 ``(rows, n)`` with unit stride
    along a row, ``state`` a contiguous ``(22, n)`` int64 state, normalised after.
    ``columns`` (default all) lets threads share one call's columns.  Returns how
    many columns overflowed (the caller raises); rows must not pass
    ``exact_sum.ROWS_PER_ADD``.
    """
    lib = _library()
    rows, n = dy.shape
    c0, c1 = columns or (0, n)
    if (dy.dtype != torch.float32 or x_hat.dtype != torch.float32 or x_hat.shape != dy.shape
            or dy.device.type != "cpu" or x_hat.device.type != "cpu"
            or (n > 1 and (dy.stride(1) != 1 or x_hat.stride(1) != 1))):
        raise ValueError("exact_dw needs two 2-D CPU float32 tensors of one shape, unit stride along rows")
    if state.shape != (22, n) or state.dtype != torch.int64 or not state.is_contiguous() or not 0 <= c0 <= c1 <= n:
        raise ValueError("state must be a contiguous (22, n) int64 tensor and columns within [0, n]")
    if rows == 0 or c0 == c1:
        return 0
    item = dy.element_size()
    over = int(lib.tgn_exact_dw_f32(dy.data_ptr() + c0 * item, dy.stride(0), x_hat.data_ptr() + c0 * item,
                                    x_hat.stride(0), rows, c1 - c0, state.data_ptr() + c0 * 8, n))
    if over == -1:
        raise MemoryError("the native exact dW kernel could not allocate its scratch")
    if over < 0:
        raise RuntimeError("the native exact dW kernel did not converge (a bug: please report it)")
    return over
