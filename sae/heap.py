"""glibc's heap (where there is one): keep freed memory for reuse while a hot loop runs, and give
freed memory back to the operating system afterwards and now and then.

glibc returns the free space at the top of its heap to the operating system once it passes the
trim threshold (twice the mmap threshold, at most 64 MB), and a training step frees more than that
at once ([4096, 576] inputs and errors, [9216, 576] gradients): the next step page-faults the same
memory back in. On this project's VMs a fault costs ~2.7 us; a TopK step (batch 4096, d_sae 9216,
2 threads, steady state) took ~8,800 (0-17,000), ~1,000 inside `keep_freed_heap`. (torch
allocates 64-byte aligned, and glibc 2.36 reuses such blocks from the heap's top, not from its
free lists: keeping the top is what lets the next step reuse them.)
`keep_freed_heap` raises the trim threshold while a loop runs: measured 0.67 -> 0.73 of the encoder
matmul limit (benchmarks/train_step.py, three interleaved runs each), peak RSS of the demo training
+40 MB. `return_free_heap` trims now and then (what the loop's temporaries left in holes; the
store reader's batches, which glibc kept here by the hundred MB between trims, now have mappings of
their own: activations/reader.py `_mapped_empty`).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

M_TRIM_THRESHOLD = -1
"""mallopt parameter: free memory at the heap's top beyond which glibc gives it back."""
M_MMAP_THRESHOLD = -3
"""mallopt parameter: blocks at least this large get their own mapping (unmapped on free)."""
MMAP_THRESHOLD = 32 << 20
"""The largest mmap threshold glibc allows (its dynamic rule's ceiling): smaller blocks come from
the heap, where a freed one is reused. The pre-activation buffer (151 MB) stays mapped on its own."""
KEPT_TRIM_THRESHOLD = 1 << 30
"""Free memory kept at the heap's top inside `keep_freed_heap` (up to 1 GiB: a step's temporaries)."""
RESTORED_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""The trim threshold afterwards: what glibc's dynamic rule sets beside a 32 MB mmap threshold."""


@cache
def _libc() -> Any:
    """glibc, or None (another OS or C library: the functions here do nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (musl has malloc_trim stubs, not this)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def return_free_heap() -> None:
    """Release the free pages of every malloc arena (a few ms); a no-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_kept_lock = threading.Lock()
_kept_depth = 0


@contextmanager
def keep_freed_heap() -> Iterator[None]:
    """Inside: freed blocks under 32 MB stay in the heap for the next allocation instead of going
    back to the operating system (no page faults for a loop that allocates the same temporaries
    every iteration). On leaving: glibc's usual thresholds (as its dynamic rule would have set
    them) and a trim, so the memory the loop kept is returned. Nests; a no-op without glibc."""
    global _kept_depth
    libc = _libc()
    if libc is None:
        yield
        return
    with _kept_lock:
        _kept_depth += 1
        if _kept_depth == 1:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _kept_lock:
            _kept_depth -= 1
            if _kept_depth == 0:
                libc.mallopt(M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)
                libc.malloc_trim(0)
