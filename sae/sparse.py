"""Sparse kernels for the TopK family: gradients and decodes that touch only the active latents.

With k active latents out of d_sae, a dense backward through the encoder costs as much as the
encoder forward again (batch x d_in x d_sae); the active entries need batch x k x d_in. Here the
dense pre-activations are computed once without autograd, and a custom function gives the
selected entries a gradient that flows to W_enc, b_enc (and b_dec) through sparse products only.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from saeworks.sae import native_sparse


class _SelectedPreActivations(torch.autograd.Function):
    """values[b, j] = x[b] @ W_enc[:, indices[b, j]] + b_enc[indices[b, j]], sparse backward."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                b_enc: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, indices)
        ctx.d_sae = W_enc.shape[1]
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[Any, ...]:
        x, indices = ctx.saved_tensors  # x [batch, d_in], indices [batch, k]
        flat = indices.reshape(-1)
        grad = grad_values.reshape(-1).to(x.dtype)
        grad_W_enc = None
        if ctx.needs_input_grad[2]:  # W_enc^T [d_sae, d_in] = G^T @ x, G the sparse [batch, d_sae] gradient
            grad_W_enc = sparse_transpose_matmul(indices, grad, x, ctx.d_sae, transposed=True)
        grad_b_enc = None
        if ctx.needs_input_grad[3]:
            grad_b_enc = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=x.device).index_add_(0, flat, grad)
        grad_x = None
        if ctx.needs_input_grad[1]:
            raise RuntimeError("the selected pre-activations do not propagate gradients to x")
        return None, grad_x, grad_W_enc, grad_b_enc, None


TOP_K_BLOCK = 16
"""Columns per block in `top_k`'s first pass."""


def top_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [..., k]: the k largest entries of each row of `pre` [..., width], in no
    order; the same set torch.topk finds, faster when k is small (`block_top_k`). Where the blocks
    do not apply (narrow rows, widths not a multiple of 16, non-contiguous rows) torch.topk itself."""
    width = pre.shape[-1]
    if width % TOP_K_BLOCK or 4 * k * TOP_K_BLOCK > width or not pre.is_contiguous():
        return pre.topk(k, dim=-1, sorted=False)
    return block_top_k(pre, k)


def block_top_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k` by blocks: the row's columns form width/16 interleaved blocks (block j: columns j,
    j + width/16, ...; an elementwise max over 16 contiguous slices finds every block's maximum). A
    block holding one of the k largest entries has its maximum among them too, so at most k blocks
    hold them all, and they are among the k blocks with the largest maxima: only those k x 16
    candidates are ranked. Measured against torch.topk: 35 against 47 ms on a CPU ([4096, 9216]
    float32, k 32, 2 threads); on a GPU see benchmarks/sparse_backward.py. `pre` must be contiguous
    with a width that is a multiple of 16."""
    width = pre.shape[-1]
    rows = pre.reshape(-1, width)  # [rows, width]
    n_blocks = width // TOP_K_BLOCK
    maxima = rows.view(-1, TOP_K_BLOCK, n_blocks).amax(dim=1)  # [rows, n_blocks]
    blocks = maxima.topk(k, dim=1, sorted=False).indices  # [rows, k]
    offsets = torch.arange(TOP_K_BLOCK, device=pre.device) * n_blocks
    columns = (blocks.unsqueeze(2) + offsets).reshape(len(rows), k * TOP_K_BLOCK)  # candidates
    values, position = rows.gather(1, columns).topk(k, dim=1, sorted=False)
    shape = (*pre.shape[:-1], k)
    return values.view(shape), columns.gather(1, position).view(shape)


def bias_top_k_(pre: torch.Tensor, bias: torch.Tensor, k: int, ascending: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Add `bias` [width] to every row of `pre` [rows, width] in place, then (values, indices)
    [rows, k]: the k largest entries of each row, as `top_k` finds them, in no order, or by
    ascending index where `ascending`.

    On a CPU, for float32 or bfloat16 rows, one native pass does both (sae/kernels/bias_top_k.c):
    measured 20 ms against 49 ms for add_ + `top_k` ([4096, 9216] float32, k 32, 2 threads), its
    entries ascending at no cost. The bias is added as `pre.add_(bias.to(pre.dtype))` adds it, bit
    for bit. Elsewhere, or without a C compiler, those two torch ops (and a sort where `ascending`)."""
    selected = native_sparse.bias_top_k_(pre, bias, k)
    if selected is None:
        pre.add_(bias.detach().to(pre.dtype))
        selected = top_k(pre, k)
        if ascending:
            selected = native_sparse.by_ascending_index(*selected)
    return selected


def sparse_transpose_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor,
                            d_sae: int, transposed: bool = False) -> torch.Tensor:
    """[d_sae, d] = M^T @ dense, M the sparse [batch, d_sae] matrix with `values` (flat, row-major)
    at columns `indices` [batch, k] of each row; transposed=True gives its transpose [d, d_sae].

    On a CPU, for float32, the native kernel (sae/kernels/sparse_grad.c): a counting sort by
    latent and one accumulator per latent, written once in the layout asked for (contiguous either
    way). Elsewhere a CSR product, transposed as a view: 3x faster on a CPU than the COO product it
    replaced (16 ms against 49 ms, batch 4096, k 32, d_sae 9216, d 576, 2 threads), and 5x on an
    H200 (1.4 ms against 6.9 ms, batch 8192, k 32, d_sae 65536, d 2304: cuSPARSE's SpMM). (Writing
    the transpose into a column-major output instead, W_enc's layout, took 2.7 ms there.)"""
    result = native_sparse.sparse_outer(indices, values, dense, d_sae, transposed)
    if result is not None:
        return result
    product = csr_transpose_matmul(indices, values, dense, d_sae)
    return product.T if transposed else product


def csr_transpose_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor,
                         d_sae: int) -> torch.Tensor:
    """`sparse_transpose_matmul`'s torch path: [d_sae, d] = M^T @ dense through a CSR matrix."""
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    rows = torch.div(order, k, rounding_mode="floor")  # each sorted entry's batch row
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=d_sae), 0, out=crow[1:])
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", each process
        warnings.simplefilter("ignore", UserWarning)
        m_t = torch.sparse_csr_tensor(crow, rows, values.reshape(-1)[order].to(dense.dtype), (d_sae, batch),
                                      check_invariants=False)
    return m_t @ dense


def dense_pre_activations(sae: Any, x_centred: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """[batch, d_sae] x_centred @ W_enc + b_enc without autograd, written into a buffer reused from
    one call to the next (in this thread): valid until the next call, which is all a training
    forward needs (its backward never reads it). A fresh 151 MB output every step costs page faults
    on a CPU (measured: addmm 339 ms, mm into a kept buffer + bias 325 ms, a fresh mm 391 ms;
    [4096 x 576] @ [576 x 9216], 2 threads). One buffer, not one per SAE: a sweep of SAEs of one
    width shares it.

    Under autocast the buffer holds the autocast dtype: the product runs in it and the bias is added
    in it (what autocast's addmm does, except that the bias is added after the product is rounded;
    bfloat16, same shapes: fresh addmm 153 ms, mm into a kept buffer + bias 130 ms, bare mm 118).

    bias=False leaves b_enc out, for `bias_top_k_` to add it in the same pass as the selection."""
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    device = x_centred.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else W_enc.dtype
    if not autocast and x_centred.dtype != W_enc.dtype:
        return torch.addmm(b_enc, x_centred, W_enc) if bias else torch.mm(x_centred, W_enc)
    buffer = workspace_buffer((x_centred.shape[0], W_enc.shape[1]), dtype, W_enc.device)
    with torch.autocast(device, enabled=False):
        torch.mm(x_centred.detach().to(dtype), W_enc.to(dtype), out=buffer)
        return buffer.add_(b_enc.to(dtype)) if bias else buffer


def workspace_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's pre-activation buffer, reallocated only when the shape, dtype or device changes."""
    buffer: torch.Tensor | None = getattr(_workspace, "pre", None)
    if buffer is None or buffer.shape != shape or buffer.device != device or buffer.dtype != dtype:
        _workspace.pre = None  # free the old one before allocating
        buffer = _workspace.pre = torch.empty(shape, dtype=dtype, device=device)
    return buffer


_workspace = threading.local()


def workspace() -> threading.local:
    """This thread's workspace: the pre-activation buffer (`workspace_buffer`) and what else an
    encode keeps between calls (the refined selection's encoder copies), all freed by
    `release_workspace`."""
    return _workspace


def release_workspace() -> None:
    """Free this thread's workspace (training, evaluation and analysis call it when they end)."""
    _workspace.__dict__.clear()


def selected_pre_activations(pre: torch.Tensor | None, x_centred: torch.Tensor, W_enc: torch.Tensor,
                             b_enc: torch.Tensor, indices: torch.Tensor,
                             selected: torch.Tensor | None = None) -> torch.Tensor:
    """Gather `pre` [batch, d_sae] at `indices` [batch, k], differentiable in W_enc and b_enc.

    `pre` must equal x_centred @ W_enc + b_enc (computed without autograd); it may be None where
    `selected` is given. When b_dec is subtracted from the input, its encoder-side gradient is
    -W_enc @ (column sums of the sparse gradient); it is added by `encoder_b_dec_grad` below rather
    than through x. `selected`: the gathered values where the caller has them (a top-k gives them:
    the gather's 131k scattered reads of the 151 MB `pre` took 1.2 ms a training step, batch 4096,
    k 32, d_sae 9216).
    """
    if selected is None:
        if pre is None:
            raise ValueError("selected_pre_activations needs the pre-activations or the selected values")
        selected = pre.gather(1, indices)  # [batch, k]
    return _SelectedPreActivations.apply(selected, x_centred.detach(), W_enc, b_enc, indices)


class _BDecThroughEncoder(torch.autograd.Function):
    """Identity on `values` whose backward also sends -W_enc @ colsum(grad) to b_dec."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor,
                indices: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(W_enc, indices)
        ctx.scale = scale
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[Any, ...]:
        W_enc, indices = ctx.saved_tensors
        per_latent = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device)
        per_latent.index_add_(0, indices.reshape(-1), grad_values.reshape(-1).to(W_enc.dtype))
        return grad_values, -ctx.scale * (W_enc.detach() @ per_latent), None, None, None


def encoder_b_dec_grad(values: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor,
                       indices: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Route the encoder-side gradient of b_dec (input centring) through the selected values.

    `scale` multiplies that gradient: a latent shard passes its number of shards, so that the
    mean of b_dec's gradient over the shards holds the decoder part once and every shard's
    encoder part in full (sae/sharded.py)."""
    return _BDecThroughEncoder.apply(values, b_dec, W_enc, indices, scale)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]]: [batch, d_in] from k active latents per row.

    An embedding bag, with a sparse backward (`_SparseDecode`): W_dec's gradient as one product
    with the sparse matrix (`sparse_transpose_matmul`) instead of embedding_bag's zero-filled
    scatter, and the values' gradient as k dot products a row. Measured against embedding_bag's own
    backward: 14-17 against 22-23 ms and 17-25 against 22-33 ms on a CPU ([4096, 32] of [9216, 576],
    2 threads, native kernels); W_dec's gradient 1.4 against 5.7 ms on an H200 ([8192, 32] of
    [65536, 2304], benchmarks/sparse_backward.py)."""
    weights = values.to(W_dec.dtype)
    if torch.is_grad_enabled() and (weights.requires_grad or W_dec.requires_grad):
        return _SparseDecode.apply(indices, weights, W_dec)
    return F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum")


ROW_DOTS_CHUNK_ELEMENTS = 1 << 26
"""`row_dots` without its native kernel gathers the decoder rows of this many entries x d_in
elements at a time (256 MB of float32), so that its temporary stays bounded at any batch size."""


def row_dots(indices: torch.Tensor, table: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """[batch, k]: dense[b] . table[indices[b, j]] (indices [batch, k], table [n, d], dense [batch, d],
    both of one dtype, which the result has). The native kernel on a CPU (float32); elsewhere the
    gathered rows' dot products, a chunk of rows at a time."""
    dots = native_sparse.sparse_row_dots(indices, table, dense)
    if dots is not None:
        return dots
    batch, k = indices.shape
    step = max(1, ROW_DOTS_CHUNK_ELEMENTS // max(1, k * table.shape[1]))
    out = torch.empty(batch, k, dtype=dense.dtype, device=dense.device)
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        torch.linalg.vecdot(table[indices[rows]], dense[rows].unsqueeze(1), out=out[rows])
    return out


class _SparseDecode(torch.autograd.Function):
    """x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]], with the sparse backward.

    The values' gradient: where the native kernels apply (a CPU, float32), `sparse_row_dots`;
    elsewhere embedding_bag's own per-sample-weights backward, which reads each decoder row in
    place (1.0 ms against 4.1 ms for gathered rows' dots on an H200, [8192, 32] of [65536, 2304]):
    the forward runs the bag on a detached decoder under autograd and keeps that small graph (it
    holds the indices and offsets, no copy of W_dec) for the backward."""

    @staticmethod
    def forward(ctx: Any, indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices, values, W_dec)
        ctx.bag = None
        if ctx.needs_input_grad[1] and not native_sparse.decoder_backward_applies(indices, values, W_dec):
            with torch.enable_grad():
                weights = values.detach().requires_grad_(True)
                decoded = F.embedding_bag(indices, W_dec.detach(), per_sample_weights=weights, mode="sum")
            ctx.bag = (weights, decoded)
            return decoded.detach()
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_x_hat: torch.Tensor) -> tuple[Any, ...]:
        indices, values, W_dec = ctx.saved_tensors
        grad = grad_x_hat.to(W_dec.dtype).contiguous()  # [batch, d_in]
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[1] and ctx.bag is not None:
            weights, decoded = ctx.bag
            (grad_values,) = torch.autograd.grad(decoded, weights, grad)
        elif ctx.needs_input_grad[1]:
            grad_values = row_dots(indices, W_dec.detach(), grad).to(values.dtype)
        ctx.bag = None
        if ctx.needs_input_grad[2]:
            grad_W_dec = sparse_transpose_matmul(indices, values.detach(), grad, W_dec.shape[0])
        return None, grad_values, grad_W_dec


def topk_reconstruction(selected: torch.Tensor, x: torch.Tensor, x_centred: torch.Tensor, W_enc: torch.Tensor,
                        b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, indices: torch.Tensor,
                        b_dec_through_encoder: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(x_hat [batch, d_in], values [batch, k], mse []) of a TopK step in one differentiable
    function: values = ReLU(selected) (the pre-activations x_centred @ W_enc + b_enc at `indices`,
    as the selection found them), x_hat = the sparse decode + b_dec, mse = `mse_per_row(x, x_hat)`.
    The same numbers and gradients as `selected_pre_activations` -> `encoder_b_dec_grad` -> ReLU ->
    `sparse_decode` + b_dec -> `mse_per_row`, in fewer passes:
    - the forward decodes each row, takes its error and the error's dot with each of the row's k
      decoder rows while those are in cache (sae/kernels/sparse_grad.c `decode_error`): the
      values' gradient of the mse is those dots scaled, so the backward does not read the
      decoder rows again; nor does it write the mse's gradient [batch, d_in] when the loss reads
      x_hat only through the mse (the error is scaled inside the sums instead);
    - the backward sorts the entries by latent once for W_dec's, W_enc's and b_enc's gradients
      (`topk_backward`; the chain sorted twice and added b_enc's and b_dec's per-latent sums with
      two more scatters).
    `values` carries no gradient. None where the native kernels do not apply (not a CPU, not
    float32, no compiler): the caller uses the chain."""
    if not torch.is_grad_enabled() or W_enc.dtype != torch.float32 or x.dtype != torch.float32 \
            or not x.is_contiguous() or b_dec.dtype != torch.float32 or x.shape != x_centred.shape \
            or not native_sparse.topk_backward_applies(indices, x_centred.detach(), W_dec.detach()):
        return None
    return _TopKReconstruction.apply(selected, x, x_centred.detach(), W_enc, b_enc, W_dec, b_dec, indices,
                                     b_dec_through_encoder)


class _TopKReconstruction(torch.autograd.Function):
    """x_hat = sum_j ReLU(selected[b, j]) W_dec[indices[b, j]] + b_dec and its mse against x, with
    `decode_error` forward and `topk_backward` backward."""

    @staticmethod
    def forward(ctx: Any, selected: torch.Tensor, x: torch.Tensor, x_centred: torch.Tensor,
                W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                indices: torch.Tensor,
                b_dec_through_encoder: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = selected.relu()  # [batch, k] in the selection's dtype (bfloat16 under autocast)
        weights = values.to(W_dec.dtype)
        out = native_sparse.decode_error(indices, weights, W_dec.detach(), b_dec.detach(), x.detach())
        if out is None:  # SAEWORKS_NATIVE turned off since `topk_reconstruction` checked
            x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum") + b_dec
            error = x_hat - x
            out = native_sparse.DecodeError(x_hat, error, error.pow(2).sum(dim=1),
                                            torch.linalg.vecdot(W_dec.detach()[indices], error.unsqueeze(1)))
        ctx.save_for_backward(values, weights, x_centred, W_enc, W_dec, indices, out.error, out.dots)
        ctx.b_dec_through_encoder = b_dec_through_encoder
        ctx.mark_non_differentiable(values)
        ctx.set_materialize_grads(False)
        return out.x_hat, values, out.squares.sum() / x.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_x_hat: torch.Tensor | None, _: torch.Tensor | None,
                 grad_mse: torch.Tensor | None) -> tuple[Any, ...]:
        values, weights, x_centred, W_enc, W_dec, indices, error, dots = ctx.saved_tensors
        if grad_x_hat is None and grad_mse is None:
            return (None,) * 9
        # d mse / d x_hat = scale * error
        scale = None if grad_mse is None else grad_mse.float() * (2.0 / error.shape[0])
        if grad_x_hat is None:  # the loss reads x_hat through the mse only: grad x_hat = scale * error
            grad_values = dots * scale  # [batch, k]
            dense, decode_weights = error, weights * scale  # W_dec's gradient sums the error, scaled
            grad_b_dec = error.sum(dim=0) * scale
        else:
            dense = grad_x_hat.float() if scale is None else torch.addcmul(grad_x_hat.float(), error, scale)
            dense = dense.contiguous()  # [batch, d_in] the reconstruction's whole gradient
            decode_weights, grad_b_dec = weights, dense.sum(dim=0)
            grad_values = row_dots(indices, W_dec.detach(), dense)  # [batch, k]
        # ReLU's gradient in the values' dtype, as autograd takes it through the chain's casts
        grad_pre = torch.where(values > 0, grad_values.to(values.dtype), 0).float()  # [batch, k]
        d_sae = W_dec.shape[0]
        grads = native_sparse.topk_backward(indices, decode_weights, grad_pre, x_centred, dense, d_sae)
        if grads is None:
            grads = native_sparse.TopKGradients(
                sparse_transpose_matmul(indices, decode_weights.reshape(-1), dense, d_sae),
                sparse_transpose_matmul(indices, grad_pre.reshape(-1), x_centred, d_sae, True),
                torch.zeros(d_sae).index_add_(0, indices.reshape(-1), grad_pre.reshape(-1)))
        if ctx.b_dec_through_encoder:  # x_centred = x - b_dec: -W_enc @ (b_enc's gradient)
            grad_b_dec = torch.addmv(grad_b_dec, W_enc.detach(), grads.b_enc, alpha=-1)
        grad_x = -(error * scale) if ctx.needs_input_grad[1] and scale is not None else None
        return None, grad_x, None, grads.W_enc, grads.b_enc, grads.W_dec, grad_b_dec, None, None


def active_latent_counts(indices: torch.Tensor, active: torch.Tensor, d_sae: int) -> torch.Tensor:
    """[d_sae] float32: on how many rows each latent is named by `indices` [batch, k] where `active`
    [batch, k] holds. A weighted count, not `fired[indices[active]] = True`: that boolean index, its
    nonzero and the scattered index_put took 2-4 ms a demo training step ([4096, 32] of 9,216), this
    0.35; and the counts serve the metrics log too (no second encode of the batch)."""
    return torch.bincount(indices.reshape(-1), weights=active.reshape(-1).float(), minlength=d_sae).float()


def dense_latents(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Scatter k active latents per row into a dense [batch, d_sae] tensor."""
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype, device=values.device).scatter_(
        1, indices, values)
