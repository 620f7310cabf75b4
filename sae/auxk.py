"""The AuxK loss (Gao et al. 2024, section 2.4): dead latents learn to explain the residual.

Shared by every TopK-family architecture. The top `aux_k` dead latents of each row reconstruct
the error the live latents left; the loss is that reconstruction's squared error divided by the
residual's total variance (scale-free, as in EleutherAI's sparsify), weighted by aux_coefficient.
"""

from __future__ import annotations

import torch

from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.sparse import encoder_b_dec_grad, selected_pre_activations, sparse_decode


def auxk_loss(sae: SparseAutoencoder, pre: torch.Tensor | None, x_centred: torch.Tensor, x: torch.Tensor,
              x_hat: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
    """Scalar AuxK loss; zero (with no graph) when no latent is dead. `pre`: the dense
    pre-activations x_centred @ W_enc + b_enc [batch, d_sae], or None where the step has none (the
    refined selection): the dead latents' are then computed here, in float32."""
    if dead_mask is None or not bool(dead_mask.any()):
        return x.new_zeros(())
    dead = dead_mask.nonzero().squeeze(1)  # [n_dead] latent ids
    aux_k = min(sae.cfg.aux_k if sae.cfg.aux_k is not None else sae.d_in // 2, len(dead))
    residual = (x - x_hat).detach()  # [batch, d_in] what the live latents missed
    with torch.no_grad():  # top aux_k among the dead columns only
        if pre is None:
            dead_pre = torch.addmm(sae.b_enc.detach()[dead], x_centred.detach(),
                                   sae.W_enc.detach().index_select(1, dead))  # [batch, n_dead]
        else:
            dead_pre = pre.index_select(1, dead)
        chosen, local = dead_pre.topk(aux_k, dim=1, sorted=False)
        indices = dead[local]  # [batch, aux_k]
    values = selected_pre_activations(pre, x_centred, sae.W_enc, sae.b_enc, indices, chosen)
    if sae.cfg.apply_b_dec_to_input:
        values = encoder_b_dec_grad(values, sae.b_dec, sae.W_enc, indices)
    residual_hat = sparse_decode(indices, values.relu(), sae.W_dec)
    variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / variance
