"""A causal LM's output head applied a few hundred predictions at a time, for CE/KL scoring.

Evaluation scores four suffix forwards per batch. Through `model(...).logits` each one makes a
[windows, context, vocab] tensor (403 MB for 16 windows of 128 tokens of a 49k vocabulary) that is
written once, read back chunk by chunk by the scoring, and freed: fresh pages every forward and
none of it in cache when scored. Here the suffix stops at the head's input (the final norm's
output, `activations.suffix.suffix_head_input`, 4.7 MB) and the head's product runs for
`rows` predictions at a time into buffers kept for the whole evaluation, each chunk scored while
in cache (demo evaluation pass 2, 8,192 tokens: 40.1 s -> 25.2-29.0 s, the same CE and KL).

Only where the head is what the model applies to get its logits: a plain `nn.Linear` (tied or
not) and no logit soft-capping or scaling in the config. `matches` checks one real forward's
logits against it before the evaluation relies on it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 29}
"""Logits made at once per buffer, by device type: 64 MiB on a CPU (341 predictions of a 49k
vocabulary in float32, 682 in bfloat16): enough rows that the head's product runs near its full
speed (21 rows at a time re-read the whole [vocab, d] matrix per 21 predictions: slower than the
full logits), few enough that two buffers stay small beside the model. In bytes, not elements: a
bfloat16 product on matrix units (AMX) wants more rows than a float32 one ([n, 576] @ [576, 49152]
bf16, 2 threads: 34 us a row at 341 rows, 28 at 682, 25 at 1,364)."""

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config keys of families that transform the head's output before returning logits (Gemma 2/3,
Cohere, Granite, ...): with any of them set, the model's own logits are used."""


class OutputHead:
    """logits = head_input @ W^T (+ b) for a block of predictions, into reused buffers."""

    def __init__(self, linear: nn.Linear) -> None:
        self.weight = linear.weight.detach()  # [vocab, d]
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.vocab = self.weight.shape[0]
        row_bytes = self.vocab * self.weight.element_size()
        self.rows = max(1, HEAD_CHUNK_BYTES.get(self.weight.device.type, 1 << 26) // row_bytes)
        self._buffers: dict[int, torch.Tensor] = {}

    @staticmethod
    def of(model: Any) -> OutputHead | None:
        """The model's head where it is a plain linear map that the model applies as is; else None."""
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
            return None
        config = getattr(model, "config", None)
        if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
            return None
        return OutputHead(head)

    def logits(self, head_input: torch.Tensor, slot: int) -> torch.Tensor:
        """[n, vocab] logits of head_input [n, d] (n <= rows), in the head's dtype, written into
        buffer `slot` (valid until that slot's next call)."""
        n = head_input.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} rows at once; the head's buffers hold {self.rows}")
        buffer = self._buffers.get(slot)
        if buffer is None:
            buffer = self._buffers[slot] = torch.empty(self.rows, self.vocab, dtype=self.weight.dtype,
                                                       device=self.weight.device)
        out = buffer[:n]
        torch.mm(head_input.to(self.weight.dtype), self.weight.t(), out=out)
        return out if self.bias is None else out.add_(self.bias)

    def matches(self, head_input: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether this head maps head_input [..., d] to the model's own `logits` [..., vocab] (up
        to the rounding of a differently blocked product)."""
        mine = F.linear(head_input.to(self.weight.dtype), self.weight, self.bias).float()
        theirs = logits.float()
        if mine.shape != theirs.shape:
            return False
        tolerance = 1e-4 if self.weight.dtype == torch.float32 else 2e-2
        scale = theirs.abs().amax().clamp_min(1.0)
        return bool(((mine - theirs).abs().amax() <= tolerance * scale).item())
