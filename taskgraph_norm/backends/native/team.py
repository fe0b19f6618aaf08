"""Which threads share the direct path's rows (``native_team.c``).

The direct path makes one native call per input; for a large input the call
shares its rows among ``torch.get_num_threads()`` threads: thread t runs the t-th
contiguous part of the rows (as torch's ``at::parallel_for`` splits them, so each
core finds its rows in its own cache) and then steals blocks left in the others'
parts (every row is computed by the same kernel whichever thread runs it: the split
never changes a bit).  The threads are, in order of
preference:

* **torch's own OpenMP team**, when torch's parallel backend is OpenMP: the C code
  enters the runtime torch already loaded (its ``GOMP_parallel`` and
  ``omp_get_thread_num``, which libgomp, LLVM's libomp and Intel's libiomp5 all
  export), so our rows run on the very
  threads torch's ops run on, with no second pool competing with them for the
  cores (torch's idle OpenMP threads spin for a while after each op; a thread of
  our own would fight them for a core, measured up to 4x slower here);
* otherwise, and always in a forked child (where an OpenMP runtime the parent used
  can hang, as torch's own ops do), one worker thread of ``native_team.c``'s own.

Nothing is loaded here: the OpenMP runtime is looked up among the libraries already
in the process (``RTLD_NOLOAD``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import torch

from ...constants import SPLIT_NUMEL
from . import loader as _native
from ..torch_ops import pools

__all__ = ["BACKWARD_SPLIT_NUMEL", "PASSIVE", "PASSIVE_SERIAL_NUMEL", "forward_threads", "openmp", "threads",
           "use_openmp", "worker_rows"]

#: The native backward shares its rows among threads from this many elements on (a
#: (64, 4096) step ran 3-7% faster on one thread than on two, (128, 4096) the same,
#: (256, 4096) 16% faster on two: benchmarks/call_overhead.py's step, 2 cores).
BACKWARD_SPLIT_NUMEL = 8 * SPLIT_NUMEL

#: Whether torch's OpenMP threads sleep as soon as a parallel region ends
#: (``OMP_WAIT_POLICY=PASSIVE``, read once, as the runtime read it when torch loaded it):
#: then every region that shares rows first wakes them.
PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
#: A forward call of at most this many elements runs on the caller's thread alone when
#: :data:`PASSIVE` holds and the OpenMP team would run its rows (:func:`threads` with
#: ``numel``): waking a sleeping thread costs about 50 us on the 2-core VM.  There an
#: fp32 ``out=`` call of (32, 4096) took 32 us alone and 91 us shared, (64, 4096) 107 us
#: either way (its training step 676 against 692 us), (96, 4096) 163 us alone and 142
#: us shared; bf16 (64, 4096) 69 against 93 us (docs/performance.md, "The wait
#: policy").  Spinning threads (the runtime's default policy) wake in a few us: there
#: the rows are shared from ``SPLIT_NUMEL`` elements on.
PASSIVE_SERIAL_NUMEL = 4 * SPLIT_NUMEL

#: The sonames of the OpenMP runtimes torch builds link (GNU, LLVM, Intel).
_RUNTIMES = ("libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so", "libomp.dylib", "libiomp5.dylib")

_lock = threading.Lock()
_chosen = False


def _candidates() -> list[str]:
    """Where torch's OpenMP runtime may be: the copies torch's wheel ships next to
    libtorch (their names may carry a hash, ``libgomp-a34b3233.so.1``), then the
    usual sonames."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    shipped = sorted(str(p) for pattern in ("libgomp*.so*", "libiomp*.so*", "libomp*.so*", "libomp*.dylib",
                                             "libiomp*.dylib") for p in lib_dir.glob(pattern))
    return [*shipped, *_RUNTIMES]


def _torch_openmp() -> tuple[int, int] | None:
    """The addresses of ``GOMP_parallel`` and ``omp_get_thread_num`` in the OpenMP
    runtime torch has loaded, or ``None``."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    if not getattr(os, "RTLD_NOLOAD", 0) or sys.platform == "win32":
        return None  # without RTLD_NOLOAD a lookup could load a second runtime
    mode = os.RTLD_NOLOAD | getattr(os, "RTLD_LAZY", 1)
    for name in _candidates():
        try:
            runtime = ctypes.CDLL(name, mode=mode)  # only one already in the process
            parallel = ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
            thread_num = ctypes.cast(runtime.omp_get_thread_num, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        if parallel and thread_num:
            return parallel, thread_num
    return None


def use_openmp(on: bool = True) -> bool:
    """Run the shared rows in torch's OpenMP team (``on``, the default once the
    kernels load) or on ``native_team.c``'s own worker thread; returns whether the
    OpenMP team is now in use.  The bits are the same either way (tests compare them)."""
    global _chosen
    with _lock:
        _chosen = True
        if not _native.available():
            return False
        found = _torch_openmp() if on else None
        parallel, thread_num = found if found is not None else (None, None)
        return bool(_native.module().team_use_openmp(parallel, thread_num))


def openmp() -> bool:
    """Whether the shared rows run in torch's OpenMP team (not in a forked child)."""
    if not _chosen:
        use_openmp(True)
    return bool(_native.available() and _native.module().team_openmp())


def threads(numel: int | None = None) -> int:
    """How many threads a native call may share its rows among: torch's thread count,
    or 1 on one of this package's own pool workers (a nested call).  With ``numel``
    (a forward's elements, its rows bound by memory, not arithmetic), also 1 for at
    most :data:`PASSIVE_SERIAL_NUMEL` elements when :data:`PASSIVE` holds and the
    OpenMP team runs the rows."""
    if not _chosen:
        use_openmp(True)
    if pools.on_worker():
        return 1
    if numel is not None and numel <= PASSIVE_SERIAL_NUMEL and PASSIVE and openmp():
        return 1
    return torch.get_num_threads()


def forward_threads(numel: int, rows: int, grain: int, split_numel: int = SPLIT_NUMEL) -> int:
    """How many threads a forward call of ``numel`` elements in ``rows`` rows shares
    them among: :func:`threads` with ``numel`` from ``split_numel`` elements on (the
    caller's threshold, which the tests lower) when there is more than one block of
    ``grain`` rows, else 1 (the direct and LayerNorm paths and the gated rows)."""
    return threads(numel) if numel >= split_numel and rows > grain else 1


def worker_rows() -> int:
    """Rows run by threads other than the callers', in this process (0 without the
    kernels): the tests check that the rows really are shared."""
    return int(_native.module().team_worker_rows()) if _native.available() else 0
