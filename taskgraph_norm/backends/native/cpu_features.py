"""The instruction-set features of this CPU, as the kernel reports them (stdlib only).

``setup.py`` runs this file (without importing the package, which needs torch) to
record the features of the CPU that built the ``-march=native`` variant of the
native kernels; :mod:`.loader` loads that variant only on a CPU that has every one
of them.  Linux only (``/proc/cpuinfo``); elsewhere :func:`features` is ``None``
and only the portable variant is built and loaded.
"""

from __future__ import annotations

__all__ = ["MARKER", "features", "parse_marker"]

#: Prefix of the feature string embedded in a host build (``native.c``'s
#: ``tgn_build_cpu``), so that the string can be read from the file without loading it.
MARKER = b"tgn-build-cpu:"


def features(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The ``flags`` (x86) or ``Features`` (Arm) of the first CPU in ``cpuinfo``;
    ``None`` where there is no such line."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features") and value.split():
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def parse_marker(data: bytes) -> frozenset[str] | None:
    """The features embedded in a host build's bytes; ``None`` when there is no marker."""
    start = data.find(MARKER)
    if start < 0:
        return None
    end = data.find(b"\0", start)
    text = data[start + len(MARKER):end if end >= 0 else None].decode("ascii", "replace")
    return frozenset(text.split())
