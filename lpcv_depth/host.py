"""Process settings of this host that the heavy stages depend on for speed."""

from __future__ import annotations

import ctypes
import functools
import platform

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO_BYTES = 2 ** 31 - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; True where that was set (glibc), False elsewhere.

    By default glibc serves every allocation of 32 MB or more (and smaller ones once the threshold
    adapts) with a fresh mmap and unmaps it on free, so a torch forward pass that allocates a new
    activation per op page-faults through every one of them: on ViT-S at 518x518 a third of the
    forward time. Served from the heap and not trimmed, freed blocks are reused as they are. The
    process keeps its peak heap until it exits, which a stage run does soon after.
    Measured: docs/history/ptq-speed.md, "Second pass"."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO_BYTES))
