"""Keeping a CPU training process's memory down: the freed tensors' memory handed back to the OS
between a step's phases, and oneDNN's cache of compiled primitives bounded.

PyTorch's CPU tensors come from the C library's ``malloc``; glibc keeps freed chunks for reuse, and
oneDNN keeps the primitives it compiled for every GEMM shape. Since a step's tensor shapes change
with every batch (sequence lengths), the process's RSS creeps up over a run although the live
tensors do not (docs/performance.md, "Freed heap memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time

from grpo_cli.errors import UserError


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> bool:
    """Return the free memory at the top of glibc's heaps and in its free pages to the OS; whether
    the C library could. Freed tensors of ever-changing shapes otherwise stay in the process."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def bound_onednn_cache(capacity: int) -> None:
    """Keep at most ``capacity`` of oneDNN's compiled primitives (its default is 1024). Each new
    batch shape compiles new GEMM primitives, with JIT code and buffers, and on CPUs a run's RSS
    grows with every shape kept (docs/performance.md). oneDNN reads the variable once, at the
    process's first primitive: this must come before any CPU matmul. A value already in the
    environment wins; 0 leaves oneDNN's default."""
    if capacity < 0:
        raise UserError(f"trainer.onednn_cache: expected 0 (oneDNN's default) or more primitives, got {capacity}")
    if capacity > 0:
        os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))


def resident_bytes() -> int:
    """The process's resident set size (Linux ``/proc/self/statm``), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """:func:`trim_heap` around a step's update, at most ``share`` of the wall time (after a trim
    that took c seconds the next waits c / share), and only once the RSS has grown since the last
    trim: a trim walks every free chunk, and what it hands back the next phase may fault in again,
    so trimming after every short step, or from a small growth, made the steps slower; from 256 MB
    (``growth``) they rarely trim.

    Steps that sample from the policy trim before the update instead, from 64 MB of growth
    (``sampled_growth``): the rollout and log-probs free memory in sizes the update does not reuse,
    and the update's peak, the step's, came on top of it. A second trim after the update kept the
    next rollout lower too, but handed back the update's own memory, which the next update faulted
    in again, a slower step. Measured in docs/performance.md, "Freed heap memory handed back to the
    OS" and "Trimming around the update"."""

    growth, sampled_growth = 256 << 20, 64 << 20

    def __init__(self, sampled: bool, share: float = 0.05):
        self.sampled, self.share, self.level, self.next_at = sampled, share, 0, 0.0

    def before_update(self) -> bool:
        """Whether it trimmed now: only for a source that samples from the policy."""
        return self.sampled and self.trim(self.sampled_growth)

    def after_update(self) -> bool:
        """Whether it trimmed now: only for a source that does not."""
        return not self.sampled and self.trim(self.growth)

    def trim(self, min_growth: int) -> bool:
        """Trim if the RSS grew by ``min_growth`` bytes since the last trim and the time share allows."""
        start = time.perf_counter()
        if start < self.next_at or resident_bytes() < self.level + min_growth or not trim_heap():
            return False
        self.level = resident_bytes()
        self.next_at = time.perf_counter() + (time.perf_counter() - start) / self.share
        return True
