"""Native kernels as torch functions: the TopK step's bias add + top-k (sae/kernels/bias_top_k.c)
and sparse gradients (sae/kernels/sparse_grad.c); lookups in sparse activations held row by row
(sae/kernels/sparse_lookup.c).

Each function answers None where its kernel does not apply (not a CPU, another dtype, no C
compiler, SAEWORKS_NATIVE=0); sae/sparse.py then uses torch ops, with the same results. Work is
split over `torch.get_num_threads()` threads of one pool: ctypes releases the GIL during a call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from saeworks.sae import native

LINE = 16
"""Floats per 64-byte cache line: latent spans start at a multiple of it, so that one thread
writes each line of a transposed gradient."""


def bias_top_k_(pre: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """pre [rows, width] += bias in place (bit for bit as `pre.add_(bias.to(pre.dtype))`), then
    (values, indices) [rows, k] of each row's k largest entries, in no order; None where the kernel
    does not apply (it needs float32 or bfloat16 rows on a CPU, a width of 16 blocks of at least 4k
    columns). Rows holding NaN: torch.topk answers for the batch (NaN counts as the largest)."""
    if pre.dim() != 2 or pre.device.type != "cpu" or not pre.is_contiguous() or bias.device.type != "cpu":
        return None
    rows, width = pre.shape
    if pre.dtype not in (torch.float32, torch.bfloat16) or width % 16 or 4 * k * 16 > width or k < 1 \
            or bias.shape != (width,) or rows == 0:
        return None
    lib = native.library("bias_top_k")
    if lib is None:
        return None
    kernel = lib.bias_top_k_f32 if pre.dtype == torch.float32 else lib.bias_top_k_bf16
    cast_bias = bias.detach().to(pre.dtype).float().contiguous()  # what add_ would add, widened
    values = torch.empty(rows, k, dtype=pre.dtype)
    indices = torch.empty(rows, k, dtype=torch.int64)
    scratch_len = width + 2 * (width // 16) + 2 * k  # what the bfloat16 kernel needs, the most

    def run(span: tuple[int, int]) -> int:
        start, stop = span
        scratch = torch.empty(scratch_len, dtype=torch.float32)
        return int(kernel(pre[start].data_ptr(), cast_bias.data_ptr(), stop - start, width, k,
                          values[start].data_ptr(), indices[start].data_ptr(), scratch.data_ptr()))

    if sum(_map(run, row_spans(rows))):
        return pre.topk(k, dim=-1, sorted=False)  # NaN somewhere (the bias is already in)
    return values, indices


class LatentOrder(NamedTuple):
    """The entries of a [batch, k] selection, counting-sorted by latent (sort_by_latent)."""

    offsets: torch.Tensor
    """[d_sae + 1] latent s's entries are [offsets[s], offsets[s + 1])."""
    rows: torch.Tensor
    """[n] each sorted entry's batch row."""
    weights: torch.Tensor
    """[n] float32 each sorted entry's weight."""

    def spans(self) -> list[tuple[int, int]]:
        """[begin, end) latent spans, one per thread, with about equal numbers of entries (a few
        frequent latents make equal numbers of latents uneven), each starting at a multiple of LINE."""
        d_sae = len(self.offsets) - 1
        total = int(self.offsets[-1])
        parts = max(1, min(torch.get_num_threads(), d_sae // LINE))
        targets = torch.tensor([total * i // parts for i in range(1, parts)], dtype=torch.int64)
        cuts = (torch.searchsorted(self.offsets, targets) // LINE * LINE).tolist()
        bounds = sorted({0, *cuts, d_sae})
        return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def sparse_outer(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, d_sae: int,
                 transposed: bool) -> torch.Tensor | None:
    """M^T @ dense [d_sae, d] (transposed: its transpose [d, d_sae], contiguous), M the [batch,
    d_sae] matrix holding `values` at `indices` [batch, k]; None where the kernel does not apply."""
    lib = _library(indices, values, dense)
    if lib is None or dense.shape[0] != indices.shape[0]:
        return None
    order = _sort_by_latent(lib, indices, values, d_sae)
    d = dense.shape[1]
    out = torch.empty((d, d_sae) if transposed else (d_sae, d), dtype=torch.float32)

    def run(span: tuple[int, int]) -> None:
        lib.sparse_outer(order.offsets.data_ptr(), order.rows.data_ptr(), order.weights.data_ptr(),
                         dense.data_ptr(), d, d_sae, *span, int(transposed), out.data_ptr())

    _map(run, order.spans())
    return out


def sparse_lookup(row_start: torch.Tensor, features: torch.Tensor, values: torch.Tensor,
                  query_rows: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor | None:
    """The values at (query_rows, query_features) (any one shape, 0 where absent) of a sparse
    matrix held row by row (row_start [rows + 1]; features [nnz] int64, ascending within each row;
    values [nnz] float32); None where the kernel does not apply."""
    tensors = (row_start, features, values, query_rows, query_features)
    if any(t.device.type != "cpu" for t in tensors) or values.dtype != torch.float32 \
            or any(t.dtype != torch.int64 for t in (row_start, features, query_rows, query_features)):
        return None
    lib = native.library("sparse_lookup")
    if lib is None:
        return None
    rows_flat = query_rows.contiguous().view(-1)
    features_flat = query_features.expand(query_rows.shape).contiguous().view(-1)
    out = torch.empty(rows_flat.shape, dtype=torch.float32)
    start, feats, vals = row_start.contiguous(), features.contiguous(), values.contiguous()

    def run(span: tuple[int, int]) -> int:
        lo, hi = span
        return int(lib.sparse_lookup(start.data_ptr(), len(start) - 1, feats.data_ptr(), vals.data_ptr(),
                                     rows_flat[lo:].data_ptr(), features_flat[lo:].data_ptr(), hi - lo,
                                     out[lo:].data_ptr()))

    if rows_flat.numel() and any(_map(run, row_spans(rows_flat.numel()))):
        raise IndexError(f"a query row is outside [0, {len(start) - 1})")
    return out.view(query_rows.shape)


def decoder_backward_applies(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> bool:
    """Whether `sparse_row_dots` and `sparse_outer` will run for this decode's backward."""
    return _library(indices, values, W_dec) is not None


def sparse_row_dots(indices: torch.Tensor, table: torch.Tensor, dense: torch.Tensor) -> torch.Tensor | None:
    """[batch, k]: dense[b] . table[indices[b, j]] (indices [batch, k] int64, table [n, d] and
    dense [batch, d] contiguous float32); None where the kernel does not apply."""
    lib = _library(indices, None, table, dense)
    if lib is None or dense.shape != (indices.shape[0], table.shape[1]):
        return None
    batch, k = indices.shape
    flat, rows = indices.contiguous(), dense
    out = torch.empty(batch, k, dtype=torch.float32)

    def run(span: tuple[int, int]) -> None:
        lib.sparse_row_dots(flat.data_ptr(), table.data_ptr(), rows.data_ptr(), k, table.shape[1], *span,
                            out.data_ptr())

    _map(run, row_spans(batch))
    return out


def _sort_by_latent(lib: Any, indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> LatentOrder:
    batch, k = indices.shape
    flat = indices.contiguous().view(-1)
    weights = values.reshape(-1).contiguous()
    n = batch * k
    order = LatentOrder(torch.empty(d_sae + 1, dtype=torch.int64), torch.empty(n, dtype=torch.int64),
                        torch.empty(n, dtype=torch.float32))
    cursor = torch.empty(d_sae, dtype=torch.int64)
    if lib.sort_by_latent(flat.data_ptr(), weights.data_ptr(), n, k, d_sae, order.offsets.data_ptr(),
                          order.rows.data_ptr(), order.weights.data_ptr(), cursor.data_ptr()) != 0:
        raise IndexError(f"a latent index is outside [0, {d_sae}): got {int(flat.min())}..{int(flat.max())}")
    return order


def _library(indices: torch.Tensor, weights: torch.Tensor | None, *tables: torch.Tensor) -> Any:
    """sae/kernels/sparse_grad.c where it applies (CPU, int64 [batch, k] indices, float32 weights
    of as many entries, contiguous float32 2-d tables), else None."""
    tensors = (indices, *tables) if weights is None else (indices, weights, *tables)
    if any(t.device.type != "cpu" for t in tensors) or indices.dtype != torch.int64 or indices.dim() != 2:
        return None
    if weights is not None and (weights.numel() != indices.numel() or weights.dtype != torch.float32):
        return None
    if any(t.dtype != torch.float32 or t.dim() != 2 or not t.is_contiguous() for t in tables):
        return None
    return native.library("sparse_grad")


def row_spans(rows: int) -> list[tuple[int, int]]:
    """[start, stop) row spans, one per thread, as even as can be (none empty)."""
    parts = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _map(run: Callable[[tuple[int, int]], Any], spans: list[tuple[int, int]]) -> list[Any]:
    """[run(span) for span in spans], on the pool when there are several."""
    if len(spans) == 1:
        return [run(spans[0])]
    return list(_pool(len(spans)).map(run, spans))


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool, grown when more threads are asked for (and made anew in a forked child,
    whose copy of the parent's pool has no threads)."""
    global _pool_pid
    with _pool_lock:
        if _pool_pid != os.getpid():
            _pools.clear()
            _pool_pid = os.getpid()
        if not _pools or _pools[-1][0] < workers:
            _pools.append((workers, ThreadPoolExecutor(max_workers=workers,
                                                       thread_name_prefix="saeworks-native")))
        return _pools[-1][1]


_pool_lock = threading.Lock()
_pools: list[tuple[int, ThreadPoolExecutor]] = []
_pool_pid = os.getpid()
