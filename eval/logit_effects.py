"""What a feature's decoder direction does by itself: its direct logit effects and its nearest
decoder neighbours. Weights only, no data; chunked over features so memory stays bounded.

Logit effect of feature f on token t: ((W_dec[f] ⊙ γ) @ W_Uᵀ)[t], with γ the final norm's
elementwise gain and W_U the unembedding: the direction's direct path to the logits, ignoring
the norm's data-dependent scale (one positive factor per token, the same for every feature).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from saeworks.activations.hooks import architecture_of
from saeworks.sae.sparse import bias_top_k_

CHUNK_ELEMENTS = 1 << 24
"""Largest [features, vocab] or [features, d_sae] block computed at once (64 MiB of float32)."""


class LogitEffects(NamedTuple):
    """Top promoted and suppressed tokens per feature, each [d_sae, k]."""

    positive_ids: torch.Tensor
    """int64: tokens the direction promotes most."""
    positive_values: torch.Tensor
    """float32: their effects, descending."""
    negative_ids: torch.Tensor
    """int64: tokens it suppresses most."""
    negative_values: torch.Tensor
    """float32: their effects, ascending (most negative first)."""

    @classmethod
    def empty(cls, d_sae: int) -> LogitEffects:
        """No logit effects: every tensor [d_sae, 0]."""
        ids, values = torch.zeros(d_sae, 0, dtype=torch.int64), torch.zeros(d_sae, 0)
        return cls(ids, values, ids.clone(), values.clone())


def final_norm_of(model: nn.Module) -> nn.Module:
    """The norm a causal LM applies before its unembedding (`ArchitectureMap.final_norm`)."""
    return model.get_submodule(architecture_of(model).final_norm)


@torch.no_grad()
def norm_gain(norm: nn.Module, d: int) -> torch.Tensor:
    """[d] float32: the elementwise gain γ of a LayerNorm/RMSNorm-like module, measured generically.

    A zero-mean, unit-RMS probe s has the same normaliser as -s, so norm(s) - norm(-s) = 2 γ s / σ
    cancels any bias; σ = sqrt(1 + eps) ≈ 1. Works for LayerNorm (with bias), RMSNorm and Gemma's
    (1 + w) RMSNorm without knowing which it is.
    """
    param = next(norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    signs = torch.ones(d, dtype=torch.float64)
    signs[1::2] = -1
    probe = signs - signs.mean()
    probe /= probe.pow(2).mean().sqrt()  # zero mean, unit RMS, no zero entries for d > 1
    s = probe.to(device=device, dtype=dtype).view(1, 1, d)
    difference = (norm(s).double() - norm(-s).double()).view(d)
    return (difference / (2 * s.double().view(d))).float()


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, gain: torch.Tensor, W_U: torch.Tensor, k: int) -> LogitEffects:
    """Top-k positive and negative logit effects of every decoder row, on W_U's device.

    W_dec [d_sae, d], gain [d], W_U [vocab, d]. Rows of fewer than k tokens are padded with id -1
    and value 0 (only when k > vocab).
    """
    device = W_U.device
    W_U = W_U.float()
    vocab, d_sae = W_U.shape[0], W_dec.shape[0]
    kept = min(k, vocab)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    out = LogitEffects(torch.full((d_sae, k), -1, dtype=torch.int64), torch.zeros(d_sae, k),
                       torch.full((d_sae, k), -1, dtype=torch.int64), torch.zeros(d_sae, k))
    scaled_dec = W_dec.to(device).float() * gain.to(device).float()  # [d_sae, d]
    for start in range(0, d_sae, chunk):
        stop = min(start + chunk, d_sae)
        effects = scaled_dec[start:stop] @ W_U.T  # [chunk, vocab]
        top = effects.topk(kept, dim=1)
        bottom = effects.topk(kept, dim=1, largest=False)
        out.positive_ids[start:stop, :kept] = top.indices.cpu()
        out.positive_values[start:stop, :kept] = top.values.cpu()
        out.negative_ids[start:stop, :kept] = bottom.indices.cpu()
        out.negative_values[start:stop, :kept] = bottom.values.cpu()
    return out


def model_logit_effects(W_dec: torch.Tensor, model: nn.Module, k: int) -> LogitEffects:
    """Logit effects through `model`'s final norm and unembedding (W_dec must live in its residual
    stream: d == hidden_size)."""
    output = model.get_output_embeddings()  # type: ignore[operator]
    if output is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings: pass the causal LM")
    W_U: torch.Tensor = output.weight  # [vocab, d]
    return logit_effects(W_dec, norm_gain(final_norm_of(model), W_U.shape[1]), W_U, k)


class Neighbours(NamedTuple):
    ids: torch.Tensor
    """[d_sae, k] int64: most similar other features (-1 where d_sae - 1 < k)."""
    cosines: torch.Tensor
    """[d_sae, k] float32: their decoder cosine similarities, descending (0 where padded)."""


NEIGHBOUR_BLOCK = 1024
"""Features per block of the similarity matrix in `decoder_neighbours`."""


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, k: int) -> Neighbours:
    """Nearest decoder directions by cosine, self excluded.

    The similarity matrix is symmetric, so it is computed in [NEIGHBOUR_BLOCK, NEIGHBOUR_BLOCK]
    blocks on and above the diagonal only, each block serving the rows of both its features: 55% of
    the full product's FLOPs for 9,216 features (0.7 s of the demo analysis' 20 s was the full
    product), and cos(a, b) is the same number in a's row and in b's. A running top k per row merges
    the blocks' own top k."""
    d_sae = W_dec.shape[0]
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)  # [d_sae, d]
    kept = min(k, d_sae - 1)
    ids = torch.full((d_sae, k), -1, dtype=torch.int64)
    cosines = torch.zeros(d_sae, k)
    if kept <= 0:
        return Neighbours(ids, cosines)
    if d_sae <= NEIGHBOUR_BLOCK:
        similar = unit @ unit.T  # [d_sae, d_sae]
        similar.fill_diagonal_(-torch.inf)
        best = similar.topk(kept, dim=1)
        ids[:, :kept], cosines[:, :kept] = best.indices.cpu(), best.values.cpu()
        return Neighbours(ids, cosines)
    best_values = torch.full((d_sae, kept), -torch.inf, device=unit.device)
    best_ids = torch.full((d_sae, kept), -1, dtype=torch.int64, device=unit.device)
    no_bias = torch.zeros(NEIGHBOUR_BLOCK, device=unit.device)

    def merge(rows: slice, similar: torch.Tensor, first_column: int) -> None:
        """Fold the top k of `similar` [rows, columns] (columns from `first_column`) into the rows'.
        The native top-k where it applies (sae/sparse.py; on a transposed block after a copy):
        2 + 4 ms for torch.topk on a [1024, 1024] block and its transpose, 2 threads."""
        block_values, block_ids = bias_top_k_(similar.contiguous(), no_bias[:similar.shape[1]],
                                              min(kept, similar.shape[1]))  # in no order
        values = torch.cat([best_values[rows], block_values], dim=1)
        candidates = torch.cat([best_ids[rows], block_ids + first_column], dim=1)
        top = values.topk(kept, dim=1)
        best_values[rows], best_ids[rows] = top.values, candidates.gather(1, top.indices)

    starts = range(0, d_sae, NEIGHBOUR_BLOCK)
    for i in starts:
        rows_i = slice(i, min(i + NEIGHBOUR_BLOCK, d_sae))
        for j in starts[starts.index(i):]:
            rows_j = slice(j, min(j + NEIGHBOUR_BLOCK, d_sae))
            similar = unit[rows_i] @ unit[rows_j].T  # [block_i, block_j]
            if i == j:
                similar.fill_diagonal_(-torch.inf)
            merge(rows_i, similar, j)
            if i != j:
                merge(rows_j, similar.T, i)
    ids[:, :kept], cosines[:, :kept] = best_ids.cpu(), best_values.cpu()
    return Neighbours(ids, cosines)
