"""Native kernels as torch functions: the TopK step's bias add + top-k (sae/kernels/bias_top_k.c)
and sparse gradients (sae/kernels/sparse_grad.c); lookups in sparse activations held row by row
(sae/kernels/sparse_lookup.c).

Each function answers None where its kernel does not apply (not a CPU, another dtype, no C
compiler, SAEWORKS_NATIVE=0); sae/sparse.py then uses torch ops, with the same results. Each kernel
splits its work over `torch.get_num_threads()` threads of torch's own OpenMP team
(sae/kernels/team.h); ctypes releases the GIL during a call.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from saeworks.sae import native

_forked = False
"""Whether this process is a fork of one that may have run OpenMP teams."""


def _mark_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_mark_forked)


def threads() -> int:
    """The threads a kernel splits its work over: torch's count; one in a forked child (GNU
    OpenMP's team does not survive a fork: there a parallel region of two threads, torch's own
    included, waits forever; one thread needs no team)."""
    return 1 if _forked else torch.get_num_threads()


def bias_top_k_(pre: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """pre [rows, width] += bias in place (bit for bit as `pre.add_(bias.to(pre.dtype))`), then
    (values, indices) [rows, k] of each row's k largest entries, by ascending index; None where the kernel
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
    found = int(kernel(pre.data_ptr(), cast_bias.data_ptr(), rows, width, k, values.data_ptr(),
                       indices.data_ptr(), threads()))
    if found < 0:
        raise MemoryError(f"bias_top_k: no memory for the per-thread scratch of {width}-wide rows")
    if found:  # NaN somewhere (the bias is already in)
        return by_ascending_index(*pre.topk(k, dim=-1, sorted=False))
    return values, indices


class EncoderCopies(NamedTuple):
    """What the refined selection reads of an encoder W_enc [d_in, d_sae] (`encoder_copies`)."""

    transposed: torch.Tensor
    """[d_sae, d_in] float32: W_enc's columns as contiguous rows."""
    rounded: torch.Tensor
    """[d_in, d_sae] bfloat16: W_enc rounded to nearest even."""
    largest_norm: float
    """The largest Euclidean norm of a column of W_enc."""
    largest_rounding: float
    """The largest Euclidean norm of a column of W_enc - rounded."""


def encoder_copies_applies() -> bool:
    """Whether `encoder_copies` and `refined_top_k` have their kernels here."""
    return native.library("bias_top_k") is not None


def encoder_copies(W_enc: torch.Tensor, into: EncoderCopies | None = None) -> EncoderCopies | None:
    """W_enc's transposed float32 and rounded bfloat16 copies with their norms in one pass
    (sae/kernels/bias_top_k.c), written into `into`'s tensors where their shapes fit (a training
    step's copies replace the last step's: 32 MB of fresh pages at the demo's shapes took longer to
    fault in than the pass); None where the kernel does not apply (a float32 CPU matrix)."""
    if W_enc.dim() != 2 or W_enc.device.type != "cpu" or W_enc.dtype != torch.float32:
        return None
    lib = native.library("bias_top_k")
    if lib is None:
        return None
    W = W_enc.detach().contiguous()
    d_in, d_sae = W.shape
    fits = into is not None and into.transposed.shape == (d_sae, d_in) and into.rounded.shape == (d_in, d_sae)
    reused = into if fits else None
    transposed = reused.transposed if reused is not None else torch.empty(d_sae, d_in)
    rounded = reused.rounded if reused is not None else torch.empty(d_in, d_sae, dtype=torch.bfloat16)
    stats = torch.empty(2, dtype=torch.float64)
    if lib.encoder_copies(W.data_ptr(), d_in, d_sae, transposed.data_ptr(), rounded.data_ptr(),
                          stats.data_ptr(), threads()) < 0:
        raise MemoryError(f"encoder_copies: no memory for the per-thread sums of a {d_sae}-wide encoder")
    return EncoderCopies(transposed, rounded, float(stats[0]), float(stats[1]))


class RefinedSelection(NamedTuple):
    """`refined_top_k`'s answer."""

    values: torch.Tensor
    """[rows, k] float32 pre-activations (bias in) of the selected latents."""
    indices: torch.Tensor
    """[rows, k] int64 each row's k latents, ascending."""
    uncertified: torch.Tensor
    """[n] int64 the rows whose entries are not valid: not certified, or not finite."""


def refined_top_k(products: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, x_rounded: torch.Tensor,
                  copies: EncoderCopies, k: int, candidates: int = 256) -> RefinedSelection | None:
    """Each row's k largest of x @ W_enc + bias in float32, chosen among the latents whose values in
    `products` (x_rounded @ copies.rounded, bfloat16 [rows, d_sae], no bias) come close enough to
    the k-th for the bound, and certified (sae/kernels/bias_top_k.c, "Refined selection"); a row
    with more than `candidates` of them is left uncertified. None where the kernel does not apply
    (CPU, contiguous, a width of 16 blocks of at least 4k columns, k <= candidates <= 256)."""
    rows, width = products.shape
    d = x.shape[1] if x.dim() == 2 else -1
    if products.dtype != torch.bfloat16 or x.dtype != torch.float32 or x_rounded.dtype != torch.bfloat16 \
            or x.shape != (rows, d) or x_rounded.shape != x.shape or copies.transposed.shape != (width, d) \
            or bias.shape != (width,) or width % 16 or 64 * k > width or not 1 <= k <= candidates \
            or candidates > 256 or rows == 0 \
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in (products, x, x_rounded)):
        return None
    lib = native.library("bias_top_k")
    if lib is None:
        return None
    bias = bias.detach().float().contiguous()
    bounds = torch.tensor([copies.largest_norm, copies.largest_rounding, float(bias.abs().max())],
                          dtype=torch.float64)
    values = torch.empty(rows, k)
    indices = torch.empty(rows, k, dtype=torch.int64)
    status = torch.empty(rows, dtype=torch.int64)
    found = int(lib.refined_top_k(products.data_ptr(), bias.data_ptr(), x.data_ptr(), x_rounded.data_ptr(),
                                  copies.transposed.data_ptr(), bounds.data_ptr(), rows, width, d, k,
                                  candidates, values.data_ptr(), indices.data_ptr(), status.data_ptr(),
                                  threads()))
    if found < 0:
        raise MemoryError(f"refined_top_k: no memory for the per-thread scratch of {width}-wide rows")
    uncertified = status.nonzero().squeeze(1) if found else status.new_empty(0)
    return RefinedSelection(values, indices, uncertified)


def by_ascending_index(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [rows, k] with each row's entries reordered by ascending index."""
    indices, order = indices.sort(dim=-1)
    return values.gather(-1, order), indices


class LatentOrder(NamedTuple):
    """The entries of a [batch, k] selection, counting-sorted by latent (sort_by_latent)."""

    offsets: torch.Tensor
    """[d_sae + 1] latent s's entries are [offsets[s], offsets[s + 1])."""
    rows: torch.Tensor
    """[n] each sorted entry's batch row."""
    weights: torch.Tensor
    """[n] float32 each sorted entry's weight."""


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
    lib.sparse_outer(order.offsets.data_ptr(), order.rows.data_ptr(), order.weights.data_ptr(),
                     dense.data_ptr(), d, d_sae, int(transposed), out.data_ptr(), threads())
    return out


class TopKGradients(NamedTuple):
    """A TopK step's sparse parameter gradients (`topk_backward`)."""

    W_dec: torch.Tensor
    """[d_sae, d] sum over entries of value * grad_x_hat[row]."""
    W_enc: torch.Tensor
    """[d, d_sae] contiguous (W_enc's layout): sum over entries of grad * x[row]."""
    b_enc: torch.Tensor
    """[d_sae] sum over entries of grad."""


def topk_backward_applies(indices: torch.Tensor, x: torch.Tensor, W_dec: torch.Tensor) -> bool:
    """Whether `topk_backward` (and `sparse_row_dots`) will run for a TopK step of this decoder on
    this centred input."""
    return x.shape[1:] == W_dec.shape[1:] and x.shape[0] == indices.shape[0] \
        and _library(indices, None, x, W_dec) is not None


def topk_backward(indices: torch.Tensor, values: torch.Tensor, grads: torch.Tensor, x: torch.Tensor,
                  grad_x_hat: torch.Tensor, d_sae: int) -> TopKGradients | None:
    """W_dec's, W_enc's and b_enc's gradients of a TopK step from one counting sort of its entries
    (sae/kernels/sparse_grad.c `topk_backward`): indices [batch, k] int64,
    values [batch, k] the selected latents' activations, grads [batch, k] the loss's gradient with
    respect to their pre-activations, x [batch, d] the centred input, grad_x_hat [batch, d] the
    reconstruction's gradient, all float32. None where the kernel does not apply."""
    lib = _library(indices, values, x, grad_x_hat)
    if lib is None or grads.dtype != torch.float32 or grads.numel() != indices.numel() \
            or grads.device.type != "cpu" or x.shape != grad_x_hat.shape or x.shape[0] != indices.shape[0]:
        return None
    batch, k = indices.shape
    n, d = batch * k, x.shape[1]
    flat, weights, flat_grads = (t.contiguous() for t in (indices, values, grads))
    offsets, rows = torch.empty(d_sae + 1, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    sorted_values, sorted_grads = torch.empty(n), torch.empty(n)
    cursor = torch.empty(d_sae, dtype=torch.int64)
    out = TopKGradients(torch.empty(d_sae, d), torch.empty(d, d_sae), torch.empty(d_sae))
    if lib.topk_backward(flat.data_ptr(), weights.data_ptr(), flat_grads.data_ptr(), batch, k, d_sae,
                         x.data_ptr(), grad_x_hat.data_ptr(), d, out.W_dec.data_ptr(), out.W_enc.data_ptr(),
                         out.b_enc.data_ptr(), offsets.data_ptr(), rows.data_ptr(), sorted_values.data_ptr(),
                         sorted_grads.data_ptr(), cursor.data_ptr(), threads()) != 0:
        raise IndexError(f"a latent index is outside [0, {d_sae}): got {int(flat.min())}..{int(flat.max())}")
    return out


class DecodeError(NamedTuple):
    """A TopK reconstruction and its error from one pass (`decode_error`)."""

    x_hat: torch.Tensor
    """[batch, d] the weighted sum of the selected decoder rows + b_dec."""
    error: torch.Tensor
    """[batch, d] x_hat - x."""
    squares: torch.Tensor
    """[batch] each row's squared error, summed over d."""
    dots: torch.Tensor
    """[batch, k] error[b] . W_dec[indices[b, j]]: half the values' gradient of the squared error."""


def decode_error(indices: torch.Tensor, weights: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 x: torch.Tensor) -> DecodeError | None:
    """x_hat = sum_j weights[b, j] W_dec[indices[b, j]] + b_dec, its error against x [batch, d]
    and what the squared error's gradient needs, each row while its decoder rows are in cache
    (sae/kernels/sparse_grad.c `decode_error`); all float32 on a CPU, else None."""
    lib = _library(indices, weights, W_dec, x)
    if lib is None or x.shape[0] != indices.shape[0] or W_dec.shape[1] != x.shape[1] \
            or b_dec.shape != (x.shape[1],) or b_dec.dtype != torch.float32 or b_dec.device.type != "cpu":
        return None
    (batch, k), (n, d) = indices.shape, W_dec.shape
    flat, flat_weights, bias = indices.contiguous(), weights.contiguous(), b_dec.contiguous()
    out = DecodeError(torch.empty(batch, d), torch.empty(batch, d), torch.empty(batch), torch.empty(batch, k))
    if lib.decode_error(flat.data_ptr(), flat_weights.data_ptr(), W_dec.data_ptr(), bias.data_ptr(),
                        x.data_ptr(), batch, k, n, d, out.x_hat.data_ptr(), out.error.data_ptr(),
                        out.squares.data_ptr(), out.dots.data_ptr(), threads()) != 0:
        raise IndexError(f"a latent index is outside [0, {n}): got {int(flat.min())}..{int(flat.max())}")
    return out


def sparse_lookup(row_start: torch.Tensor, features: torch.Tensor, values: torch.Tensor,
                  query_rows: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor | None:
    """The values at (query_rows, query_features) (any one shape, 0 where absent) of a sparse
    matrix held row by row (row_start [rows + 1]; features [nnz] int64, ascending within each row;
    values [nnz] float32); None where the kernel does not apply."""
    lib = _lookup_library(values, row_start, features, query_rows, query_features)
    if lib is None:
        return None
    rows_flat = query_rows.contiguous().view(-1)
    features_flat = query_features.expand(query_rows.shape).contiguous().view(-1)
    out = torch.empty(rows_flat.shape, dtype=torch.float32)
    start, feats, vals = row_start.contiguous(), features.contiguous(), values.contiguous()
    if rows_flat.numel() and lib.sparse_lookup(
            start.data_ptr(), len(start) - 1, feats.data_ptr(), vals.data_ptr(), rows_flat.data_ptr(),
            features_flat.data_ptr(), rows_flat.numel(), out.data_ptr(), threads()):
        raise IndexError(f"a query row is outside [0, {len(start) - 1})")
    return out.view(query_rows.shape)


def sparse_window_lookup(row_start: torch.Tensor, features: torch.Tensor, values: torch.Tensor,
                         tokens: torch.Tensor, query_rows: torch.Tensor, query_features: torch.Tensor,
                         window: int, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each query's latent around its row: tokens [n, C] int32 (-1 outside the row's window) and
    values [n, C] float32 (0 outside or where inactive) at rows query_rows - before .. + after
    (C = before + 1 + after) of a sparse matrix held row by row (as `sparse_lookup`) whose rows are
    consecutive windows of `window` rows, tokens [rows] int64 its rows' tokens; query_rows and
    query_features [n] int64. None where the kernel does not apply."""
    lib = _lookup_library(values, row_start, features, tokens, query_rows, query_features)
    if lib is None:
        return None
    start, feats, vals, toks, rows_flat, features_flat = (
        t.contiguous() for t in (row_start, features, values, tokens, query_rows, query_features))
    width = before + 1 + after
    out_tokens = torch.empty(rows_flat.shape[0], width, dtype=torch.int32)
    out_values = torch.empty(rows_flat.shape[0], width, dtype=torch.float32)
    if rows_flat.numel() and lib.sparse_window_lookup(
            start.data_ptr(), len(start) - 1, feats.data_ptr(), vals.data_ptr(), toks.data_ptr(),
            rows_flat.data_ptr(), features_flat.data_ptr(), rows_flat.shape[0], window, before, after,
            out_tokens.data_ptr(), out_values.data_ptr(), threads()):
        raise IndexError(f"a query row is outside [0, {len(start) - 1})")
    return out_tokens, out_values


def _lookup_library(values: torch.Tensor, *indices: torch.Tensor) -> Any:
    """sae/kernels/sparse_lookup.c where it applies (every tensor on the CPU, float32 values,
    int64 indices), else None."""
    if values.device.type != "cpu" or values.dtype != torch.float32 \
            or any(t.device.type != "cpu" or t.dtype != torch.int64 for t in indices):
        return None
    return native.library("sparse_lookup")


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
    flat = indices.contiguous()
    out = torch.empty(batch, k, dtype=torch.float32)
    lib.sparse_row_dots(flat.data_ptr(), table.data_ptr(), dense.data_ptr(), k, table.shape[1], batch,
                        out.data_ptr(), threads())
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
