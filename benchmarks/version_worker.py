"""One version's timing process for ``benchmarks/versions.py`` (started by it, not by hand).

    PYTHONPATH=TREE python benchmarks/version_worker.py --tree TREE --suite SUITE [--threads N]

It imports ``taskgraph_norm`` from ``TREE`` (and refuses to go on if the import
came from anywhere else), builds the cases of ``version_cases.py`` from this
folder, warms each up once, and then answers on stdout, one JSON line per request
on stdin: first a hello (where the package came from, torch, threads, kernels,
the case names and their calls per timing), then for each ``{"case": NAME}`` one
timing of that case as ``{"seconds": per_call}``.  Between requests it waits on
stdin, so it takes no CPU while the other version is timed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any


def _protocol_stream() -> IO[str]:
    """The real stdout for the replies; anything else written to fd 1 (a library's
    print, a C warning) goes to stderr, so it cannot break a reply."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def _import_from(tree: Path) -> Any:
    tgn = importlib.import_module("taskgraph_norm")
    found = Path(tgn.__file__ or "(a namespace package)").resolve().parent
    if found != (tree / "taskgraph_norm").resolve():
        raise SystemExit(f"version_worker: taskgraph_norm was imported from {found}, not from {tree}: "
                         "put the tree first on PYTHONPATH")
    return tgn


def _kernels(tree: Path) -> str:
    """Which kernels this version runs, in its own words: older trees keep the native
    kernels' loader at ``executors.native``, newer ones at ``backends.native.loader``.
    The file is looked for in the tree first: an editable install of another checkout
    would otherwise supply a module the tree lacks."""
    for name in ("taskgraph_norm.backends.native.loader", "taskgraph_norm.executors.native"):
        if (tree / (name.replace(".", "/") + ".py")).is_file():
            return str(importlib.import_module(name).describe())
    return "(no native kernel loader in this tree)"


def _foreign_modules(tree: Path, modules: Mapping[str, object] | None = None) -> list[str]:
    """Loaded ``taskgraph_norm`` modules (of ``modules``, default ``sys.modules``) whose
    file is not in ``tree``: an editable install's finder serves a submodule the tree
    lacks from its own checkout."""
    root = (tree / "taskgraph_norm").resolve()
    files = {name: getattr(module, "__file__", None) for name, module in dict(modules or sys.modules).items()
             if name.split(".")[0] == "taskgraph_norm"}
    return sorted(name for name, file in files.items() if file and not Path(file).resolve().is_relative_to(root))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's choice)")
    args = parser.parse_args(argv)
    replies = _protocol_stream()
    tgn = _import_from(args.tree)
    import torch

    from common import seconds_per_call
    from version_cases import cases

    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = {case.name: case for case in cases(tgn, args.suite)}
    for case in chosen.values():
        case.run()  # warm-up: workspaces, dispatch caches, first-touch pages
    kernels = _kernels(args.tree)
    if foreign := _foreign_modules(args.tree):
        raise SystemExit(f"version_worker: modules from outside {args.tree}: {', '.join(foreign)}")
    replies.write(json.dumps({
        "package": str((args.tree / "taskgraph_norm").resolve()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "kernels": kernels,
        "cases": [[case.name, case.calls] for case in chosen.values()],
    }) + "\n")
    for line in sys.stdin:
        case = chosen[json.loads(line)["case"]]
        replies.write(json.dumps({"seconds": seconds_per_call(case.run, case.calls)}) + "\n")


if __name__ == "__main__":
    main()
