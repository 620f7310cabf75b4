"""Give freed heap memory back to the operating system (glibc's malloc_trim), where there is one.

glibc keeps blocks freed after a large free in its heaps (its mmap threshold grows with each large
free, up to 32 MB): a training run's RSS then holds ~160 MB of the reader's freed 4.7 MB batches.
Trimming now and then returns them without slowing every large allocation (a fixed 1 MB mmap
threshold did that too, but page-faulted every step's big temporaries: ~10% slower steps).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def return_free_heap() -> None:
    """Release the free pages of every malloc arena (a few ms); a no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
