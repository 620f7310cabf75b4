"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token, ReLU'd.

Training touches only the active latents: one dense encoder matmul without autograd, then the
selected entries get a sparse gradient and a sparse (embedding-bag) decode, see sae/sparse.py.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch

from saeworks.sae.auxk import auxk_loss
from saeworks.sae.base import SparseAutoencoder, TrainContext, TrainOutput, mse_per_row
from saeworks.sae.refined_selection import refined_top_k
from saeworks.sae.sparse import (
    active_latent_counts,
    bias_top_k_,
    dense_latents,
    dense_pre_activations,
    encoder_b_dec_grad,
    selected_pre_activations,
    sparse_decode,
    top_k,
    topk_reconstruction,
)


class TopKSAE(SparseAutoencoder):
    """Exactly k active latents per token, at training and at inference."""

    architecture = "topk"

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [batch, k] of the latents this architecture keeps."""
        return top_k(pre, self.cfg.k)

    @torch.no_grad()
    def selected_dense(self, x_centred: torch.Tensor, ascending: bool = False
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(pre [rows, d_sae] or None, values [rows, k], indices [rows, k]): the top k of the
        pre-activations x_centred @ W_enc + b_enc, float32 values (`ascending`: each row's entries by
        ascending latent). Where the refined selection runs (sae/refined_selection.py: a bfloat16
        product chooses, float32 decides; measured faster here) there are no dense pre-activations
        and pre is None; else pre is the reused buffer (`dense_pre_activations`) with b_enc added in
        the selection's pass (`bias_top_k_`). `select` of the dense pre-activations gives the same
        entries (up to float32 rounding where the refined selection ran)."""
        refined = refined_top_k(self.W_enc, self.b_enc, x_centred, self.cfg.k,
                                dense=lambda: self._dense_selection(x_centred, True)[1:])
        if refined is not None:
            return None, *refined
        return self._dense_selection(x_centred, ascending)

    def _dense_selection(self, x_centred: torch.Tensor, ascending: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = dense_pre_activations(self, x_centred, bias=False)  # [rows, d_sae], b_enc not yet in
        values, indices = bias_top_k_(pre, self.b_enc, self.cfg.k, ascending)
        return pre, values, indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        values, indices = top_k(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    @torch.no_grad()
    def encode_active(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` as its k entries per row: (values, indices) [rows, k], values ReLU'd (zeros are
        inactive), each row's entries by ascending latent, never a dense [rows, d_sae] result; the
        pre-activations go into the buffer `dense_pre_activations` reuses (valid until its next
        call). No autograd."""
        _, values, indices = self.selected_dense(self.centred(x), ascending=True)
        return values.relu(), indices

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        x_centred = self.centred(x)
        pre, selected, indices = self.selected_dense(x_centred)  # [batch, d_sae] or None, no graph
        fused = topk_reconstruction(selected, x, x_centred, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                    indices, self.cfg.apply_b_dec_to_input)
        if fused is not None:
            x_hat, values, mse = fused  # [batch, d_in], [batch, k], []
        else:
            values = self.active_values(pre, x_centred, indices, selected)  # [batch, k]
            x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec
            mse = mse_per_row(x, x_hat)
        aux = auxk_loss(self, pre, x_centred, x, x_hat, ctx.dead_mask)
        active = values > 0
        fired = active_latent_counts(indices, active, self.d_sae)
        return TrainOutput(x_hat, mse + self.cfg.aux_coefficient * aux, mse, x.new_zeros(()), aux,
                           active.sum(dim=1).float().mean(), fired)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """`decode(encode(x))` through the k active latents when no gradient is asked for: the
        pre-activations into the reused buffer, the top k and a sparse decode, without the dense
        [rows, d_sae] latents and the dense decoder product (75 against 211 ms for [16, 127, 576]
        rows of the demo SAE, 2 threads: the spliced forward of every evaluation batch)."""
        if torch.is_grad_enabled() or type(self).encode is not TopKSAE.encode:
            return super().reconstruct(x)
        values, indices = self.encode_active(x.reshape(-1, x.shape[-1]))  # [rows, k]
        x_hat = sparse_decode(indices, values, self.W_dec.detach()) + self.b_dec.detach()
        return x_hat.view(x.shape)

    def active_values(self, pre: torch.Tensor | None, x_centred: torch.Tensor, indices: torch.Tensor,
                      selected: torch.Tensor | None = None) -> torch.Tensor:
        """ReLU of the selected pre-activations, differentiable through sparse kernels (`selected`:
        pre at indices where the selection already has them; pre may then be None)."""
        values = selected_pre_activations(pre, x_centred, self.W_enc, self.b_enc, indices, selected)
        if self.cfg.apply_b_dec_to_input:
            values = encoder_b_dec_grad(values, self.b_dec, self.W_enc, indices)
        return values.relu()

    def inference_cfg(self) -> dict[str, Any]:
        return {"architecture": "topk", "k": self.cfg.k}

    def dense_training_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, d_sae] latents as training sees them (for tests against the dense path)."""
        pre = self.pre_activations(x)
        _, indices = self.select(pre.detach())
        return dense_latents(indices, pre.gather(1, indices).relu(), self.d_sae)


def encodes_top_k(sae: SparseAutoencoder) -> TypeGuard[TopKSAE]:
    """Whether `sae` is a TopK SAE that encodes as TopKSAE does (BatchTopK, for one, does not), so
    that its `encode_active` gives exactly `encode`'s non-zero entries."""
    return isinstance(sae, TopKSAE) and type(sae).encode is TopKSAE.encode
