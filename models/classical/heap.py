"""Gives the heap memory a model's batches freed back to the system.

glibc's malloc keeps what a model's short-lived tensors free (sizes that
change with every batch's shape) in its heap, fragmented, and returns little
of it: measured with MiniLM under varied batches on a 2-vCPU Xeon, a replica's
resident memory doubled in three minutes and was still climbing
(``benchmarks/heap_trim.py``). So after a batch, at most once per
``every_s``, the replica looks at its resident memory and, when it has grown
by more than ``growth`` since the last trim, calls ``malloc_trim(0)``. Trimming
costs a few milliseconds, and the pages it gives back are faulted in again
when they are next used: trimming only on growth keeps that rare.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

TRIM_EVERY_S = 1.0
GROWTH = 0.05


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None where the C library has none)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def resident_bytes() -> int:
    """This process's resident memory (Linux's ``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """``after_batch`` trims the heap when, checked at most once per
    ``every_s``, resident memory has grown by more than ``growth`` since the
    last trim (or the first check)."""

    def __init__(
        self,
        every_s: float = TRIM_EVERY_S,
        growth: float = GROWTH,
        trim: Callable[[int], int] | None = None,
        rss: Callable[[], int] = resident_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trim = trim if trim is not None else malloc_trim()
        self._every_s = every_s
        self._growth = growth
        self._rss = rss
        self._clock = clock
        self._checked = clock()
        self._floor: int | None = None

    def after_batch(self) -> None:
        if self._trim is None or self._clock() - self._checked < self._every_s:
            return
        self._checked = self._clock()
        rss = self._rss()
        if self._floor is None or rss < self._floor:
            self._floor = rss
        elif rss > self._floor * (1 + self._growth):
            self._trim(0)
            self._floor = self._rss()  # what trimming could not give back is the new level
