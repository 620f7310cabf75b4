"""sae/heap.py: freed memory kept for reuse inside `keep_freed_heap`, given back on leaving."""

from __future__ import annotations

import resource

import pytest
import torch

from saeworks.sae import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="glibc's allocator only")

BLOCK = 21 << 20
"""A [9216, 576] float32 gradient's size: under the 32 MB mmap threshold, over glibc's start one."""


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def written_blocks(count: int = 4) -> list[torch.Tensor]:
    """`count` fresh [BLOCK] tensors, written (a step's temporaries: gradients, errors)."""
    return [torch.empty(BLOCK // 4).fill_(1.0) for _ in range(count)]


def test_memory_freed_inside_stays_with_the_process_for_the_next_step() -> None:
    with heap.keep_freed_heap():
        blocks = written_blocks()
        held = resident_bytes()
        del blocks  # 84 MB free at the heap's top: glibc's usual threshold (<= 64 MB) trims it
        given_back = held - resident_bytes()
    assert given_back < BLOCK // 2, f"{given_back >> 20} MB went back to the system inside"


def test_nested_contexts_keep_until_the_outermost_leaves_and_then_give_memory_back() -> None:
    with heap.keep_freed_heap():
        with heap.keep_freed_heap():
            pass
        blocks = written_blocks()
        del blocks
        held = resident_bytes()
        assert heap._kept_depth == 1
    released = held - resident_bytes()
    assert released >= 3 * BLOCK, f"only {released >> 20} MB given back on leaving"


def test_leaving_by_an_exception_gives_the_memory_back_too() -> None:
    held = 0
    with pytest.raises(RuntimeError, match="inside"), heap.keep_freed_heap():
        blocks = written_blocks()
        del blocks
        held = resident_bytes()
        raise RuntimeError("inside")
    assert held - resident_bytes() >= 3 * BLOCK
    assert heap._kept_depth == 0
