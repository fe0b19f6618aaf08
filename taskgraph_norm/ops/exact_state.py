"""The exact weight gradient's per-call states (zeroed CPU states, reused), and the
lookup by ``id`` its carries and hooks are found by on every call.

A fresh ``(22, n)`` int64 state is hundreds of KiB that malloc maps and the memset
faults in page by page (~45 us of a (64, 4096) training step); a state a carry has
dropped (the gradient cleared) is kept as the next call's instead, when nothing else
holds it.  :mod:`.exact_grad` makes and drops the states.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import weakref
from typing import Generic, TypeVar

import torch

from ..kernels import exact_sum as es

__all__ = ["IdLookup", "recycle_state", "zero_", "zero_state"]

#: numel -> one CPU state a carry dropped, reused by the next :func:`zero_state` of
#: that size.  At most :data:`_SPARES_MAX` sizes are kept.
_spares: dict[int, torch.Tensor] = {}
_spares_lock = threading.Lock()
_SPARES_MAX = 8


def zero_state(numel: int, device: torch.device | str | None, *, blank: bool = False) -> torch.Tensor:
    """:func:`~taskgraph_norm.kernels.exact_sum.empty_state`, on CPU zeroed by one
    ``memset`` (``torch.zeros`` fills its 22 rows in parallel on torch's OpenMP team,
    whose wake-up cost 50-130 us of a (64, 4096) training step on 2 cores, against
    ~12 us for the memset), in a dropped state of that size when one is kept.  With
    ``blank``, a CPU state is not zeroed: its memory holds anything, for a kernel that
    writes it whole (the fused backward's ``fresh`` state)."""
    if device is not None and (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
        return es.empty_state(numel, device)
    with _spares_lock:
        state = _spares.pop(numel, None)
    if state is None:
        state = torch.empty(es.STATE_ROWS, numel, dtype=torch.int64)
    if not blank:
        zero_(state)
    return state


def zero_(state: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU ``state`` zeroed by one ``memset`` (:func:`zero_state`'s)."""
    ctypes.memset(state.data_ptr(), 0, state.numel() * state.element_size())
    return state


def recycle_state(state: torch.Tensor) -> None:
    """Keep ``state`` (an exact sum's, passed as ``total.state`` by a caller that holds
    the sum alone) as a spare when nothing else holds it or its storage."""
    # the references: the sum's slot, this frame's argument and getrefcount's
    if (state.device.type != "cpu" or not state.is_contiguous() or state.storage_offset() != 0
            or sys.getrefcount(state) > 3
            or torch._C._storage_Use_Count(state.untyped_storage()._cdata) > 2):  # with untyped_storage()'s
        return
    with _spares_lock:
        if len(_spares) < _SPARES_MAX or state.shape[1] in _spares:
            _spares[int(state.shape[1])] = state


_V = TypeVar("_V")


class IdLookup(Generic[_V]):
    """Values found by their key object's ``id``, each entry holding weak references to
    the key and the value: the per-call lookup of a parameter's carry or hooks, beside
    the ``WeakIdKeyDictionary`` that owns them (whose lookup makes a weak reference each
    time).  The key's reference tells a live entry from a reused ``id``."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[object], weakref.ref[_V]]] = {}

    def get(self, key: object) -> _V | None:
        entry = self._entries.get(id(key))
        return None if entry is None or entry[0]() is not key else entry[1]()

    def put(self, key: object, value: _V, live: int) -> None:
        """Remember ``value`` for ``key``; ``live``: how many keys the owner holds (past
        twice that, the entries of keys gone are dropped)."""
        self._entries[id(key)] = (weakref.ref(key), weakref.ref(value))
        if len(self._entries) > 2 * live + 64:
            self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}

    def pop(self, key: object) -> None:
        self._entries.pop(id(key), None)
