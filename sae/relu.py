"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates - April 2024").

    f = relu(W_enc^T (x - b_dec) + b_enc),   loss = mse + sparsity_coefficient * sum_i f_i ||W_dec_i||

The decoder rows are free (no unit-norm constraint): the penalty weighs each activation by its row's
norm, so shrinking a row cannot buy a smaller penalty. Rows start at norm 0.1 with W_enc = W_dec^T,
as that update recommends. Saved as SAELens' "standard" architecture (relu(pre) at inference).
The backward is dense (every latent may be active), unlike the TopK family's sparse kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from saeworks.sae.base import SparseAutoencoder, TrainContext, TrainOutput, mse_per_row


class ReLUSAE(SparseAutoencoder):
    """ReLU latents, L1 penalty weighted by decoder-row norms."""

    architecture = "relu"
    sparsity_coefficient_field = "l1_coefficient"
    unit_norm_decoder = False

    def initial_decoder_norm(self) -> float:
        return 0.1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        latents = self.encode(x)  # [batch, d_sae]
        x_hat = self.decode(latents)
        mse = mse_per_row(x, x_hat)
        sparsity = (latents * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        active = latents.detach() > 0
        return TrainOutput(x_hat, mse + ctx.sparsity_coefficient * sparsity, mse, sparsity, x.new_zeros(()),
                           active.sum(dim=1).float().mean(), active.sum(dim=0, dtype=torch.float32))

    def inference_cfg(self) -> dict[str, Any]:
        return {"architecture": "standard"}
