"""The native kernels' extension module: how it is imported, and the ABI version and
constants a build must report before anything of it is called.

The module (``csrc/native_module.c``) is the only binding to the C code: each of its
functions wraps the ``tgn_native.h`` entry point of the same name with ``tgn_``
dropped, taking tensors as addresses (ints, or ``None``) and sizes as ints, in the
prototype's order (``tests/test_constants.py`` checks its signatures against the
header).  Bump :data:`~taskgraph_norm.constants.NATIVE_ABI` whenever an entry point's
arguments or meaning change, so that a build left from an older install is never
called with the new arguments; a build made from other values of
:mod:`taskgraph_norm.constants` is refused too (:func:`check_constants`).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from ... import constants

__all__ = ["ABI", "check_constants", "expected_constants", "import_module"]

#: The version the module's ``native_abi()`` must return.
ABI = constants.NATIVE_ABI


def import_module(path: Path, name: str) -> Any:
    """The extension module built at ``path`` (already checked by the caller: see
    loader.py), imported as ``name`` without a search of ``sys.path``, once its ABI
    version and constants are this package's.  Raises ImportError (not a module, or
    not a build of this package) or OSError (a stale build)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    if spec is None:
        raise ImportError(f"{path} is not an extension module")
    module: ModuleType = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    reported = module.native_abi() if hasattr(module, "native_abi") else None  # None: older than ABI 17
    if reported != ABI:
        raise OSError(f"{path} is a stale build (ABI {reported}, want {ABI}): reinstall the package")
    check_constants(module, path)
    return module


def expected_constants() -> dict[str, int]:
    """What a build of this version must report: every constant of
    :mod:`taskgraph_norm.constants`."""
    return {name: value for name, value in vars(constants).items()
            if name.isupper() and type(value) is int}


def check_constants(module: Any, path: Path) -> None:
    """Raise OSError when ``module`` was built from other constants than this
    package's (a stale build: its kernels would give other bits)."""
    built: dict[str, int] = module.constants()
    want = expected_constants()
    if built != want:
        differ = sorted(n for n in built.keys() | want.keys() if built.get(n) != want.get(n))
        raise OSError(f"{path} was built from other constants ({', '.join(differ)} differ from "
                      "taskgraph_norm/constants.py): rebuild it (pip install ., or python setup.py build_ext --inplace)")
