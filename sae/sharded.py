"""Latent-sharded (tensor-parallel) TopK and BatchTopK SAEs: each rank holds a slice of the latents.

A shard of an SAE with d_sae latents over S shards is an ordinary SAE of the same class with
d_sae / S latents: W_enc[:, s], b_enc[s], W_dec[s] for its slice s, and the whole (replicated)
b_dec. A training step on the batch x that every shard of a replica reads:

1. each shard computes its pre-activations [batch, d_sae / S] (the one dense matmul, split S ways);
2. selection across shards, as OpenAI's reference implementation does: each shard's local top-k
   candidates (TopK: per row; BatchTopK: the local top k * batch) are gathered, the global top-k
   is taken among them, and each shard keeps those of its candidates that won (the global top-k
   of the union of the local top-ks is the global top-k);
3. each shard decodes its winners into a partial reconstruction [batch, d_in]; the partials are
   summed over the shards (`_SumOverShards`: all-reduce forward, identity backward, because every
   shard computes the same loss from the same sum);
4. AuxK runs the same way over the dead latents of all shards.

Gradients: W_enc, b_enc and W_dec of a shard get exactly the gradient those columns and rows get in
one process. b_dec's decoder-side gradient is the same on every shard and its encoder-side one
(input centring) is a per-shard part; the encoder part is multiplied by S, so that the MEAN of
b_dec's gradient over the shards (the trainer averages it over all ranks) is the decoder part
once plus the sum of the encoder parts. Gradient clipping takes the norm over all shards.

`shard_of` slices a full SAE (so the initialisation equals one process's); `assemble` gathers the
shards back into the full SAE that is saved.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from saeworks.sae.base import SparseAutoencoder, TrainContext, TrainOutput, mse_per_row
from saeworks.sae.batchtopk import BatchTopKSAE, batch_topk, smallest_selected
from saeworks.sae.distributed import LatentMesh
from saeworks.sae.sparse import (
    active_latent_counts,
    dense_pre_activations,
    encoder_b_dec_grad,
    selected_pre_activations,
    sparse_decode,
    top_k,
)
from saeworks.sae.topk import TopKSAE

SHARDABLE: tuple[type[SparseAutoencoder], ...] = (TopKSAE, BatchTopKSAE)
"""Architectures that latent sharding trains (exact classes: Matryoshka's nested losses are not)."""
SHARDED_KEYS = ("W_enc", "b_enc", "W_dec")
"""Parameters split over the shards; b_dec (and BatchTopK's threshold) are replicated."""


def sharding_problem(architecture: str, d_sae: int, k: int | None, shards: int) -> str | None:
    """Why an SAE cannot be split into `shards` latent shards, or None when it can."""
    if architecture not in {cls.architecture for cls in SHARDABLE}:
        return (f"architecture {architecture!r} cannot be latent-sharded; "
                f"train.latent_shards supports {', '.join(cls.architecture for cls in SHARDABLE)}")
    if d_sae % shards:
        return f"d_sae={d_sae} does not divide into {shards} latent shards"
    if k is not None and k > d_sae // shards:
        return f"k={k} is more than the {d_sae // shards} latents of one of {shards} shards"
    return None


def shard_slice(d_sae: int, mesh: LatentMesh) -> slice:
    width = d_sae // mesh.shards
    return slice(mesh.shard * width, (mesh.shard + 1) * width)


@torch.no_grad()
def shard_of(sae: SparseAutoencoder, mesh: LatentMesh) -> SparseAutoencoder:
    """This rank's shard of a full SAE: its slice of the latents, the replicated rest."""
    problem = sharding_problem(sae.architecture, sae.d_sae, sae.cfg.k, mesh.shards)
    if problem is not None or type(sae) not in SHARDABLE:
        raise ValueError(problem or f"{type(sae).__name__} cannot be latent-sharded")
    part = shard_slice(sae.d_sae, mesh)
    with torch.random.fork_rng(devices=[]):  # the shard's own (discarded) init must not draw from
        # the RNG stream: the next SAE's init then equals one process's
        local = type(sae)(replace(sae.cfg, d_sae=sae.d_sae // mesh.shards)).to(sae.W_dec.device)
    state = sae.state_dict()
    sliced = {"W_enc": state["W_enc"][:, part], "b_enc": state["b_enc"][part],
              "W_dec": state["W_dec"][part]}
    local.load_state_dict({key: sliced.get(key, value).clone() for key, value in state.items()})
    return local


@torch.no_grad()
def assemble(local: SparseAutoencoder, full: SparseAutoencoder, mesh: LatentMesh) -> SparseAutoencoder:
    """Load every shard of this replica into `full` (collective over the replica's shards)."""
    state = local.state_dict()
    gathered = {key: mesh.gather_shards(state[key]) for key in SHARDED_KEYS}  # [shards, ...]
    joined = {"W_enc": torch.cat(list(gathered["W_enc"]), dim=1),
              "b_enc": gathered["b_enc"].reshape(-1), "W_dec": torch.cat(list(gathered["W_dec"]))}
    full.load_state_dict({key: joined.get(key, value) for key, value in state.items()})
    return full


class _SumOverShards(torch.autograd.Function):
    """Partial reconstructions summed over the shards; the backward is the identity, since every
    shard computes the same loss from the same sum."""

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, mesh: LatentMesh) -> torch.Tensor:
        return mesh.sum_over_shards_(partial.clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad, None


def sum_over_shards(partial: torch.Tensor, mesh: LatentMesh) -> torch.Tensor:
    out: torch.Tensor = _SumOverShards.apply(partial, mesh)
    return out


def won_across_shards(candidates: torch.Tensor, keep: int, mesh: LatentMesh) -> torch.Tensor:
    """[rows, c] bool: which of this shard's `candidates` [rows, c] are among the `keep` largest
    of their row over every shard's candidates (the same number c on every shard)."""
    rows, c = candidates.shape
    pooled = mesh.gather_shards(candidates).permute(1, 0, 2).reshape(rows, mesh.shards * c)
    chosen = pooled.topk(keep, dim=1, sorted=False).indices
    won = torch.zeros(pooled.shape, dtype=torch.bool, device=candidates.device).scatter_(1, chosen, True)
    return won[:, mesh.shard * c:(mesh.shard + 1) * c]


def topk_selection(pre: torch.Tensor, k: int, mesh: LatentMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [batch, k] local latent ids, keep [batch, k] bool): each row's global top k."""
    values, indices = top_k(pre, k)
    return indices, won_across_shards(values, k, mesh)


def batch_topk_selection(pre: torch.Tensor, k: int, mesh: LatentMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, keep) [batch, width]: this shard's part of the batch's global top k * batch."""
    indices, keep = batch_topk(pre, k)  # this shard's own top k * batch, exactly that many kept
    values = pre.gather(1, indices)[keep]  # [k * batch] in row order
    won = won_across_shards(values.unsqueeze(0), values.numel(), mesh).squeeze(0)
    chosen = keep.clone()
    chosen[keep] = won
    return indices, chosen


def shard_values(sae: SparseAutoencoder, pre: torch.Tensor, x_centred: torch.Tensor,
                 indices: torch.Tensor, mesh: LatentMesh) -> torch.Tensor:
    """ReLU of the selected pre-activations with sparse gradients (sae/topk.py), b_dec's encoder
    part scaled by the number of shards (module docstring)."""
    values = selected_pre_activations(pre, x_centred, sae.W_enc, sae.b_enc, indices)
    if sae.cfg.apply_b_dec_to_input:
        values = encoder_b_dec_grad(values, sae.b_dec, sae.W_enc, indices, scale=float(mesh.shards))
    return values.relu()


def sharded_training_forward(sae: SparseAutoencoder, x: torch.Tensor, ctx: TrainContext,
                             mesh: LatentMesh) -> TrainOutput:
    """`training_forward` of one shard (a collective over the replica's shards): every shard
    returns the loss, mse and l0 of the whole SAE, and `fired` of its own latents."""
    x_centred = sae.centred(x)
    batchwise = isinstance(sae, BatchTopKSAE)
    with torch.no_grad():
        pre = dense_pre_activations(sae, x_centred)  # [batch, d_sae / shards], no graph
        select = batch_topk_selection if batchwise else topk_selection
        indices, keep = select(pre, int(sae.cfg.k or 0), mesh)
    values = shard_values(sae, pre, x_centred, indices, mesh) * keep
    x_hat = sum_over_shards(sparse_decode(indices, values, sae.W_dec), mesh) + sae.b_dec
    mse = mse_per_row(x, x_hat)
    aux = sharded_auxk_loss(sae, pre, x_centred, x, x_hat, ctx.dead_mask, mesh)
    active = values.detach() > 0
    if isinstance(sae, BatchTopKSAE):
        sae.update_threshold_to(mesh.min_over_all_(smallest_selected(values.detach(), active)))
    fired = active_latent_counts(indices, active, sae.d_sae)
    l0 = mesh.sum_over_shards_(active.sum().float()) / x.shape[0]
    return TrainOutput(x_hat, mse + sae.cfg.aux_coefficient * aux, mse, x.new_zeros(()), aux, l0, fired)


def sharded_auxk_loss(sae: SparseAutoencoder, pre: torch.Tensor, x_centred: torch.Tensor,
                      x: torch.Tensor, x_hat: torch.Tensor, dead_mask: torch.Tensor | None,
                      mesh: LatentMesh) -> torch.Tensor:
    """sae/auxk.py's loss over the dead latents of every shard: each shard offers its top aux_k
    dead latents per row (padded with -inf), the global top aux_k win."""
    n_dead = torch.zeros((), device=x.device) if dead_mask is None else dead_mask.sum().float()
    total = int(mesh.sum_over_shards_(n_dead.clone()).item())  # the same on every shard
    if total == 0:
        return x.new_zeros(())
    assert dead_mask is not None
    aux_k = min(sae.cfg.aux_k if sae.cfg.aux_k is not None else sae.d_in // 2, total)
    residual = (x - x_hat).detach()  # [batch, d_in]
    with torch.no_grad():
        dead = dead_mask.nonzero().squeeze(1)  # [local dead] local latent ids
        offered = min(aux_k, len(dead))
        candidates = pre.new_full((pre.shape[0], aux_k), -torch.inf)
        indices = torch.zeros(candidates.shape, dtype=torch.long, device=pre.device)
        if offered:
            best, local = pre.index_select(1, dead).topk(offered, dim=1, sorted=False)
            candidates[:, :offered], indices[:, :offered] = best, dead[local]
        keep = won_across_shards(candidates, aux_k, mesh)
    values = shard_values(sae, pre, x_centred, indices, mesh) * keep
    residual_hat = sum_over_shards(sparse_decode(indices, values, sae.W_dec), mesh)
    variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / variance


@torch.no_grad()
def sharded_encode(sae: SparseAutoencoder, x: torch.Tensor, mesh: LatentMesh) -> torch.Tensor:
    """[batch, d_sae / shards] this shard's latents as the full SAE's `encode` gives them."""
    if isinstance(sae, BatchTopKSAE):
        return sae.encode(x)  # a per-token threshold: no shard needs another's values
    pre = sae.pre_activations(x)
    indices, keep = topk_selection(pre, int(sae.cfg.k or 0), mesh)
    return torch.zeros_like(pre).scatter_(1, indices, pre.gather(1, indices).relu() * keep)


@torch.no_grad()
def clip_sharded_grad_norm_(sae: SparseAutoencoder, max_norm: float, mesh: LatentMesh) -> None:
    """`torch.nn.utils.clip_grad_norm_` over the whole SAE: the norm is taken over every shard's
    gradients and the replicated b_dec's once."""
    sharded = [p.grad for key, p in sae.named_parameters() if key in SHARDED_KEYS and p.grad is not None]
    squares = torch.stack([g.float().pow(2).sum() for g in sharded]).sum()
    total = mesh.sum_over_shards_(squares)
    if sae.b_dec.grad is not None:
        total = total + sae.b_dec.grad.float().pow(2).sum()
    coefficient = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
    for p in sae.parameters():
        if p.grad is not None:
            p.grad.mul_(coefficient.to(p.grad.dtype))
