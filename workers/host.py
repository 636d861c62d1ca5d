"""Host settings of a process whose engines step on their own threads (local mode, replicas, benches).

Why: CPU torch runs its intra-op parallelism on OpenMP (libgomp). Each thread that runs a parallel op
gets its own worker team, and once a process holds more OpenMP threads than CPUs, libgomp stops
spinning between parallel regions: every small op then pays a futex wake-up. An engine thread next to
a main thread that had done parallel work (e.g. loaded the model) ran ~2× slower on 2 cores than the
same engine on the main thread. So the main thread stays single-threaded and each engine thread sets
its own count; large freed buffers stay in the heap instead of being returned to the kernel and
faulted in again on the next step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_KEEP_BYTES = 1 << 30


def prepare_serving_process(num_threads: int | None = None) -> int:
    """Call on the main thread before it does any torch work. Returns the intra-op thread count the
    engine threads should use (``num_threads``, else torch's current default); the main thread
    itself is left with one."""
    n = num_threads or torch.get_num_threads()
    keep_freed_memory()
    torch.set_num_threads(1)
    return n


def keep_freed_memory() -> None:
    """Ask glibc to serve large tensors from one heap and keep freed pages (no mmap/munmap and page
    faults per step). A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP_BYTES), (_M_TRIM_THRESHOLD, _KEEP_BYTES)):
            libc.mallopt(param, value)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; keeping the allocator's defaults")


def set_engine_thread(num_threads: int | None) -> None:
    """On an engine thread, before its first forward: its own intra-op thread count (None: unchanged)."""
    if num_threads:
        torch.set_num_threads(num_threads)
