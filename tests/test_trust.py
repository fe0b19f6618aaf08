"""No code loaded from where another user can write, native kernels built at
install, loud fallbacks, fork safety (docs/reliability.md, "What is loaded from where"
and "Fork safety").

The loading tests run a copy of the package (tests/_trust_helpers.py) in a child
process, so that each starts with its own first load and warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import multiprocessing
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent import devices
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.backends.native import abi as native_abi
from taskgraph_norm.backends.torch_ops import pools
from taskgraph_norm.backends.native import team
from taskgraph_norm.backends.native.cpu_features import MARKER
from taskgraph_norm.backends.native.direct import SPLIT_NUMEL

from ._trust_helpers import CC, REPO, WARNING_CATEGORY, native_status, package_copy, probe, run_probe
from .helpers import bits

NATIVE, WHY_NOT = native_status()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {WHY_NOT}")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


@functools.lru_cache(maxsize=None)
def torch_ops_digests() -> str:
    """The digests of ``probe("float", "exact")`` on the torch ops (TGN_NATIVE=0)."""
    proc = run_probe(probe("float", "exact"), TGN_NATIVE="0", warnings_as_errors=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[-1]


# -- no code from a place another user can write --------------------------------------


PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("TGN_TEST_MARKER");
    FILE *f = fopen(marker ? marker : "/dev/null", "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int tgn_native_abi(void) { return -1; }
"""


@needs_cc
def test_a_planted_library_in_a_shared_folder_never_runs(tmp_path: Path) -> None:
    """A library with a constructor, planted in a world-writable folder that every
    environment variable the loader ever read points to (under the name the loader
    would look for there, and others), never runs; the kernels still run."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone can create files here
    planted = tmp_path / "planted.so"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(planted), str(src)], check=True)
    marker = tmp_path / "marker"
    for name in ("native.so", *(f"_native_{v}{s}" for v in ("host", "portable") for s in (".so", ".abi3.so"))):
        shutil.copy(planted, shared / name)
    for cache in (shared, shared / "taskgraph_norm", shared / ".cache" / "taskgraph_norm"):
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(planted, cache / "native-0123456789abcdef.so")
    code = textwrap.dedent("""
        import os, shutil
        from taskgraph_norm.backends.native import loader as native
        # Wherever this version says its library is: if that is in the shared folder,
        # the planted library is there under that name.
        path = native.library_path()
        if path is not None and str(path).startswith(os.environ["SHARED"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.environ["PLANTED"], path)
    """) + probe("float", "exact")
    env = {"SHARED": str(shared), "PLANTED": str(planted), "TGN_TEST_MARKER": str(marker),
           "TGN_CACHE_DIR": str(shared), "XDG_CACHE_HOME": str(shared), "HOME": str(shared),
           "TMPDIR": str(shared), "TGN_NATIVE_MARCH": "x86-64"}
    proc = run_probe(code, **env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "the planted library ran"
    assert proc.stdout.splitlines()[-1] == torch_ops_digests()  # the right bits
    if native.available():
        assert proc.stdout.splitlines()[0] == "native True"  # and from the kernels
    # Negative control: loading the planted file does run its constructor.
    control = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(planted)!r})"],
                             env={**os.environ, "TGN_TEST_MARKER": str(marker)}, timeout=60)
    assert control.returncode == 0 and marker.exists()


@needs_native
def test_the_library_is_loaded_from_the_package_folder() -> None:
    path = native.library_path()
    assert path is not None and path.parent == Path(native.__file__).resolve().parent
    assert path.name.startswith(("_native_host", "_native_portable"))


@needs_native
def test_a_library_in_a_world_writable_folder_is_refused(tmp_path: Path) -> None:
    """The package's own folder made writable by everyone: the libraries in it are
    refused, loudly, and the torch ops give the same bits."""
    pkg = package_copy(tmp_path)
    (pkg / "backends" / "native").chmod(0o777)
    proc = run_probe(probe("float", "exact"), root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "native False"
    assert "writable by every user" in proc.stderr and proc.stderr.count(WARNING_CATEGORY) == 1
    assert proc.stdout.splitlines()[-1] == torch_ops_digests()


# -- a corrupt or missing library is loud ---------------------------------------------


@needs_native
@pytest.mark.parametrize("which", ["host", "every"])
def test_a_corrupt_library_never_silently_disables_the_kernels(tmp_path: Path, which: str) -> None:
    """Garbage in place of the host build: the portable one runs, with a warning;
    garbage in place of every build: the torch ops run, with a warning that says why
    and what it costs.  Either way the bits are the same."""
    pkg = package_copy(tmp_path)
    libs = sorted((pkg / "backends" / "native").glob("_native_*"))
    assert libs
    for lib in libs:
        if which == "every" or lib.name.startswith("_native_host"):
            lib.write_bytes(b"\x7fELF this is not a library")
    proc = run_probe(probe("float", "exact"), root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(WARNING_CATEGORY) == 1 and "failed to load" in proc.stderr, proc.stderr
    has_host = any(lib.name.startswith("_native_host") for lib in libs)
    assert proc.stdout.splitlines()[0] == ("native False" if which == "every" or not has_host else "native True")
    if which == "every":
        assert "torch ops" in proc.stderr and "slower" in proc.stderr and "docs/reliability.md" in proc.stderr
    assert proc.stdout.splitlines()[-1] == torch_ops_digests()


STALE_MODULE_C = r"""
#include <Python.h>
static PyObject *native_abi(PyObject *self, PyObject *unused) { return PyLong_FromLong(ABI); }
static PyMethodDef methods[] = {{"native_abi", native_abi, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native_portable", NULL, -1, methods};
PyMODINIT_FUNC PyInit__native_portable(void) { return PyModule_Create(&module); }
"""


@needs_cc
@pytest.mark.parametrize("abi", ["older", "none"])
def test_a_stale_build_is_refused_before_any_kernel_runs(tmp_path: Path, abi: str) -> None:
    """An extension module left from another version (another ``native_abi()``, or none:
    a build from before the module had every entry point) in place of every build: it
    is imported, refused on its ABI alone, and the torch ops run with one warning."""
    pkg = package_copy(tmp_path)
    for lib in (pkg / "backends" / "native").glob("_native_*"):
        lib.unlink()
    src = tmp_path / "stale.c"
    code = STALE_MODULE_C.replace("ABI", str(native_abi.ABI - 1))
    src.write_text(code if abi == "older" else code.replace('{"native_abi", native_abi, METH_NOARGS, NULL}, ', ""))
    target = pkg / "backends" / "native" / f"_native_portable{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    assert CC is not None
    subprocess.run([CC, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", "-o", str(target), str(src)],
                   check=True, capture_output=True)
    proc = run_probe(probe("float", "exact"), root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "native False"
    assert proc.stderr.count(WARNING_CATEGORY) == 1 and "stale build" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == torch_ops_digests()


def test_missing_kernels_warn_once_and_opting_out_is_silent(tmp_path: Path) -> None:
    """No library (an install without a compiler): exactly one NativeKernelsWarning
    however many calls, saying why and what it costs; TGN_NATIVE=0 runs the same
    torch ops with no warning at all (the child turns every warning into an error)."""
    pkg = package_copy(tmp_path)
    for lib in (pkg / "backends" / "native").glob("_native_*"):
        lib.unlink()
    code = probe("float", "exact", "float", "exact") + "print(native.describe())\n"
    missing = run_probe(code, root=tmp_path)
    assert missing.returncode == 0, missing.stderr
    assert missing.stderr.count(WARNING_CATEGORY) == 1, missing.stderr
    assert "not built" in missing.stderr and "slower" in missing.stderr and "TGN_NATIVE=0" in missing.stderr
    assert "not built" in missing.stdout.splitlines()[-1]  # describe() says why too
    off = run_probe(code, root=tmp_path, TGN_NATIVE="0", warnings_as_errors=True)
    assert off.returncode == 0 and off.stderr == "", off.stderr
    assert missing.stdout.splitlines()[1] == off.stdout.splitlines()[1]


@needs_native
def test_a_host_build_for_another_cpu_is_never_loaded(tmp_path: Path) -> None:
    """A host build whose CPU had a feature this one lacks is not loaded (not even
    opened: here it is not a library at all); the portable build runs, with one
    warning (exact plans are slower on it), or none with TGN_NATIVE=portable."""
    pkg = package_copy(tmp_path)
    host = next((pkg / "backends" / "native").glob("_native_host*"), None)
    if host is None:
        pytest.skip("no host build here")
    host.write_bytes(b"not a library " + MARKER + b"sse2 tgn_no_such_feature\0")
    code = probe("float", "exact") + "print(native.describe())\n"
    proc = run_probe(code, root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(WARNING_CATEGORY) == 1 and "tgn_no_such_feature" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[0] == "native True"
    assert "portable build" in proc.stdout and "tgn_no_such_feature" in proc.stdout
    assert proc.stdout.splitlines()[1] == torch_ops_digests()
    chosen = run_probe(code, root=tmp_path, warnings_as_errors=True, TGN_NATIVE="portable")
    assert chosen.returncode == 0 and chosen.stderr == "", chosen.stderr
    assert chosen.stdout.splitlines()[:2] == proc.stdout.splitlines()[:2]


# -- the install-time build -----------------------------------------------------------


@needs_cc
@pytest.mark.parametrize("cc, built", [("{cc} -O2", True), ("/bin/false", False)])
def test_the_build_is_optional_and_takes_a_compiler_with_arguments(tmp_path: Path, cc: str, built: bool) -> None:
    """setup.py's build: `CC="gcc -O2"` (a compiler with arguments) builds the
    kernels; a compiler that fails leaves them out and the build still succeeds."""
    env = {**os.environ, "CC": cc.format(cc=CC)}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    libs = sorted(p.name.split(".")[0] for p in (tmp_path / "lib").rglob("_native_*"))
    assert libs == (["_native_host", "_native_portable"][-len(libs):] if built else []), libs
    if built:
        assert "_native_portable" in libs
        built = next((tmp_path / "lib").rglob("_native_portable*"))
        module = native_abi.import_module(built, "taskgraph_norm.backends.native._native_portable")
        assert module.native_abi() == native_abi.ABI
    else:
        assert "failed" in proc.stderr.lower() or "failed" in proc.stdout.lower()


# -- fork safety ------------------------------------------------------------------------


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(bits(t).numpy().tobytes()).hexdigest()


def _run_every_pool(x: torch.Tensor, graph: tgn.Graph) -> list[str]:
    """The compiled executor over several tiles on two threads, the direct native
    path shared with other threads (torch's OpenMP team in the parent, native_team.c's
    own worker in a child, where an OpenMP runtime the parent used can hang: fp32,
    >= SPLIT_NUMEL elements, called until another thread has run rows, or 50 times),
    and the concurrent executor
    on the default worker pool.  (No backward: torch's own CPU autograd hangs in a
    child forked after the parent ran a backward, with or without this library.)"""
    compiled = anyio.run(functools.partial(tgn.execute, graph, x, executor="compiled", threads=2, tile_rows=16))
    start = team.worker_rows()
    for _ in range(50):
        direct = tgn.normalize_sync(x)
        if team.worker_rows() > start:
            break
    shared = team.worker_rows() > start or not NATIVE or torch.get_num_threads() < 2
    concurrent = tgn.normalize_sync(x, executor="concurrent")
    return [_digest(compiled), _digest(direct), _digest(concurrent), str(shared), str(team.openmp())]


def _child(conn: Any, x: torch.Tensor, graph: tgn.Graph, stale: dict[int, Any] | None) -> None:
    if stale is not None:  # the negative control: the parent's pools, as before the fix
        pools._tile_pools.update(stale)
    conn.send(_run_every_pool(x, graph))


def _in_forked_child(x: torch.Tensor, graph: tgn.Graph, timeout: float, stale: dict[int, Any] | None = None
                     ) -> list[str] | None:
    """What the child computes, or ``None`` when it has not finished in ``timeout`` s."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        # Python 3.12+ warns on every fork of a process with threads: that is the point here.
        warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
        proc = ctx.Process(target=_child, args=(send, x, graph, stale), daemon=True)
        proc.start()
    try:
        if not recv.poll(timeout):
            return None
        got: list[str] = recv.recv()
        proc.join(timeout)
        return got
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_runs_every_pool_and_gets_the_same_bits() -> None:
    """After the parent used the compiled executor's tile pool, the native team and
    the concurrent executor's worker pool, a child forked from
    it runs them all (no hang; the child's team worker runs rows too) and gets the
    parent's bits.  Negative control: given back the parent's pools, the child hangs."""
    x = torch.randn(512, 1024)
    assert x.numel() >= SPLIT_NUMEL
    graph = tgn.build_graph(1024, chunk_size=16)
    expected = _run_every_pool(x, graph)
    assert expected[-2] == "True", "no other thread ran a row in the parent"
    openmp = expected.pop()  # the parent may share on OpenMP; a child never does
    expected.append("False")
    assert pools._tile_pools and devices._default_pools  # the parent really used every pool
    assert _in_forked_child(x, graph, timeout=120) == expected
    assert _in_forked_child(x, graph, timeout=120) == expected  # and again: nothing left broken
    assert _in_forked_child(x, graph, timeout=5, stale=dict(pools._tile_pools)) is None
    assert _run_every_pool(x, graph) == [*expected[:-1], openmp]  # the parent's pools still work


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_private_worker_pool_restarts_in_a_forked_child() -> None:
    """A pool the caller made and passed (not the default one) works in the child too."""
    x = torch.randn(16, 128)
    graph = tgn.build_graph(128, chunk_size=16)
    with devices.WorkerPool(2) as pool:
        run = functools.partial(tgn.execute, graph, x, executor="concurrent", pool=pool)
        expected = _digest(anyio.run(run))
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
            proc = ctx.Process(target=lambda: send.send(_digest(anyio.run(run))), daemon=True)
            proc.start()
        try:
            assert recv.poll(120), "the child hung"
            assert recv.recv() == expected
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
        assert _digest(anyio.run(run)) == expected
