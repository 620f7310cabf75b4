"""Dead-latent counters: tokens since each latent last fired, the same on every rank.

The counters are updated from `fired` flags that were already averaged over ranks (a latent fired
in the global batch when its mean flag is > 0), so every rank holds identical counters and hands
identical dead masks to AuxK without communicating again.
"""

from __future__ import annotations

import torch


class DeadLatents:
    """Per SAE, a `[d_sae]` int64 count of tokens since the latent last fired."""

    def __init__(self, d_saes: list[int], dead_after_tokens: int, device: torch.device) -> None:
        self.dead_after_tokens = dead_after_tokens
        self.since_fired = [torch.zeros(d, dtype=torch.int64, device=device) for d in d_saes]

    def masks(self) -> list[torch.Tensor]:
        """Per SAE, `[d_sae]` bool: latents silent for at least dead_after_tokens tokens."""
        return [count >= self.dead_after_tokens for count in self.since_fired]

    def update(self, fired: list[torch.Tensor], tokens: int) -> None:
        """Advance every counter by the step's global `tokens`; reset those that fired (> 0)."""
        for count, flags in zip(self.since_fired, fired, strict=True):
            count.add_(tokens).masked_fill_(flags > 0, 0)

    def counts(self) -> list[int]:
        """Dead latents per SAE."""
        return [int(mask.sum()) for mask in self.masks()]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"dead.{i}": count.cpu() for i, count in enumerate(self.since_fired)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, count in enumerate(self.since_fired):
            count.copy_(tensors[f"dead.{i}"])
