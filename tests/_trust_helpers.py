"""Child processes for tests/test_trust.py: each loads the native kernels afresh,
from this package or from a copy of it that a test has altered."""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from taskgraph_norm.errors import NativeKernelsWarning
from taskgraph_norm.backends.native import loader as native

REPO = Path(__file__).resolve().parents[1]
#: The C compiler the tests build their own libraries with (None: none here).
CC = shutil.which(shlex.split(os.environ.get("CC") or "cc")[0])
#: How the warning shows in a child's stderr.
WARNING_CATEGORY = "NativeKernelsWarning"


def native_status() -> tuple[bool, str | None]:
    """Whether the native kernels load in this process, and why not.  The one
    NativeKernelsWarning of a process whose kernels do not load is expected here
    (the suite then runs on torch ops); where a compiler exists,
    test_native.py::test_native_kernels_are_built_where_a_compiler_is fails instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NativeKernelsWarning)
        return native.available(), native.why_unavailable()


def package_copy(root: Path) -> Path:
    """A copy of the imported package (its built libraries included) under ``root``;
    returns the copy's ``taskgraph_norm`` folder."""
    source = Path(native.__file__).resolve().parents[2]
    return Path(shutil.copytree(source, root / "taskgraph_norm", ignore=shutil.ignore_patterns("__pycache__")))


def probe(*accumulates: str) -> str:
    """Code printing ``native <available>`` and then the digests of the compiled
    executor's output, one per accumulation."""
    return textwrap.dedent(f"""
        import hashlib, torch, taskgraph_norm as tgn
        from taskgraph_norm.backends.native import loader as native
        from taskgraph_norm.testing import bits
        x = torch.randn(33, 1000, generator=torch.Generator().manual_seed(1)) * 100
        outs = [tgn.normalize_sync(x, accumulate=a, executor="compiled") for a in {accumulates!r}]
        print("native", native.available())
        print(*(hashlib.sha256(bits(o).numpy().tobytes()).hexdigest()[:16] for o in outs))
    """)


def run_probe(code: str, root: Path | None = None, warnings_as_errors: bool = False,
              **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (in ``root``, whose package comes first on
    the path, when given), every warning shown, or raised with ``warnings_as_errors``."""
    full_env = {**os.environ, **env}
    if root is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(root), full_env.get("PYTHONPATH", "")])
    flag = "error" if warnings_as_errors else "always"
    return subprocess.run([sys.executable, "-W", flag, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, cwd=root, timeout=300)


#: The probes that compare the builds (:func:`build_runs`), by name, as their test modules
#: register them on import (:func:`build_probe`).
BUILD_PROBES: dict[str, str] = {}
#: The builds the probes compare: TGN_NATIVE=portable, the default build, torch ops.
BUILDS = ("portable", "1", "0")
#: Runs each probe of a JSON object {name: code} from stdin, its own globals and captured
#: output each, and writes {name: [returncode, stdout, stderr]}.
PROBE_RUNNER = """
import contextlib, io, json, sys, traceback
out = {}
for name, code in json.loads(sys.stdin.read()).items():
    stdout, stderr, rc = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        rc = 1
        stderr.write(traceback.format_exc())
    out[name] = [rc, stdout.getvalue(), stderr.getvalue()]
sys.__stdout__.write(json.dumps(out))
"""


def build_probe(name: str, code: str) -> str:
    """Registers ``code`` (its first line printed: the loaded library's name, or None) as a
    probe of the builds; returns ``name``, for :func:`build_runs`."""
    BUILD_PROBES[name] = textwrap.dedent(code)
    return name


@functools.cache
def _runs_of(names: tuple[str, ...]) -> tuple[dict[str, list[Any]], ...]:
    """Every probe in ``names`` run under each of BUILDS: one fresh interpreter per build
    (the three at once) runs them all, one after the other, each in its own globals."""
    code = json.dumps({name: BUILD_PROBES[name] for name in names})
    procs = [subprocess.Popen([sys.executable, "-W", "always", "-c", PROBE_RUNNER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TGN_NATIVE": build}) for build in BUILDS]
    runs = []
    for build, proc in zip(BUILDS, procs):
        out, err = proc.communicate(code, timeout=600)
        assert proc.returncode == 0, f"TGN_NATIVE={build}: {err}"
        runs.append(json.loads(out))
    return tuple(runs)


def build_runs(name: str) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The probe ``name`` (:func:`build_probe`) as it ran under TGN_NATIVE=portable, the
    default build and TGN_NATIVE=0 (torch ops), in that order.  The first call runs every
    registered probe (one interpreter per build shares the start-up of torch)."""
    runs = _runs_of(tuple(sorted(BUILD_PROBES)))
    return tuple(subprocess.CompletedProcess(["probe", name, f"TGN_NATIVE={build}"], *run[name])
                 for build, run in zip(BUILDS, runs))


def builds_agree(name: str) -> tuple[list[str], list[str]]:
    """The probe ``name`` under TGN_NATIVE=portable, the default build and TGN_NATIVE=0
    (:func:`build_runs`); asserts every run succeeded, loaded what it should and printed
    the same lines after the first; returns the portable and default runs' lines."""
    portable, default, off = build_runs(name)
    for proc in (portable, default, off):
        assert proc.returncode == 0, proc.stderr
    p, d, o = (proc.stdout.splitlines() for proc in (portable, default, off))
    assert p[0].startswith("_native_portable") and o[0] == "None"
    assert p[1:] == d[1:] == o[1:]
    return p, d


def spy_taken(monkeypatch: Any, owners: tuple[object, ...], name: str) -> list[bool]:
    """Replace ``name`` on each of ``owners`` (the defining module first) by a spy that
    records whether each call returned a result (True) or ``None`` (left to torch ops)."""
    taken: list[bool] = []
    real = getattr(owners[0], name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        taken.append(found is not None)
        return found

    for owner in owners:
        monkeypatch.setattr(owner, name, spy)
    return taken


def spy_layer_taken(monkeypatch: Any) -> list[bool]:
    """:func:`spy_taken` over the native LayerNorm forward's C calls, both entries: the
    general path's ``layer_rows`` and the faces' warm entry (``layer_direct``'s ``routed``,
    recorded when it returns a result: a ``None`` there is followed by the general
    path).  The LayerNorm pipelines' cache is a fresh one for the test, so each pipeline
    resolves its warm entry through the spy (and none keeps it afterwards)."""
    from taskgraph_norm.backends.native import layer as native_layer
    from taskgraph_norm.pipeline import layer as pipeline_layer

    taken = spy_taken(monkeypatch, (native_layer,), "layer_rows")
    real = native_layer.layer_direct

    def direct(plan: Any) -> Any:
        routed = real(plan)
        if routed is None:
            return None

        def spy(*args: Any) -> Any:
            found = routed(*args)
            if found is not None:
                taken.append(True)
            return found

        return spy

    monkeypatch.setattr(native_layer, "layer_direct", direct)
    monkeypatch.setattr(pipeline_layer, "LAYER_PIPELINES", {})
    return taken


def spy_c_face(monkeypatch: Any, name: str) -> list[bool]:
    """Records each call of the C face ``backends.native.face.<name>`` (``"layer_face"``
    or ``"rms_face"``, installed by a warm call first): True when it gave the result,
    False when it declined."""
    from taskgraph_norm.backends.native import face as native_face

    real = getattr(native_face, name)
    assert real is not native_face._not_installed
    calls: list[bool] = []

    def spy(*args: Any) -> Any:
        y = real(*args)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(native_face, name, spy)
    return calls


def warm_face_call(face: list[bool], call: Callable[[], Any]) -> Any:
    """``call()`` once it is warm: two calls first (the first builds the pipeline, the
    second resolves the C face's plan), ``face`` (:func:`spy_c_face`'s record) cleared,
    then the call whose face use the test checks."""
    for _ in range(2):
        call()
    del face[:]
    return call()
