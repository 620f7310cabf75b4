"""Per-prediction cross-entropy and KL of logits by one native pass pair per row
(sae/kernels/logit_scores.c), for the evaluation's downstream scoring (eval/metrics.py).

Each function answers None where the kernel does not apply (not a CPU, a dtype other than float32
or bfloat16, rows not contiguous, no C compiler, SAEWORKS_NATIVE=0); the caller then runs its
torch ops, which give the same numbers to float rounding (tests/test_metrics.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saeworks.sae import native


class RowScores(NamedTuple):
    """Per prediction, float64: -log p(target) of the first logits, of the second, and
    KL(p_first || p_second); the last two None when only one set of logits was scored."""

    ce: torch.Tensor
    other_ce: torch.Tensor | None
    kl: torch.Tensor | None


def logit_scores(logits: torch.Tensor, targets: torch.Tensor,
                 other: torch.Tensor | None = None) -> RowScores | None:
    """Scores of logits [rows, vocab] (and `other`, the same shape and dtype) against targets
    [rows]; None where the kernel does not apply."""
    if logits.dim() != 2 or logits.device.type != "cpu" or logits.stride(1) != 1 \
            or logits.dtype not in (torch.float32, torch.bfloat16) or targets.shape != logits.shape[:1]:
        return None
    if other is not None and (other.shape != logits.shape or other.dtype != logits.dtype
                              or other.stride() != logits.stride() or other.device.type != "cpu"):
        return None
    lib = native.library("logit_scores")
    if lib is None:
        return None
    rows, vocab = logits.shape
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    ce = torch.empty(rows, dtype=torch.float64)
    other_ce = torch.empty(rows, dtype=torch.float64) if other is not None else None
    kl = torch.empty(rows, dtype=torch.float64) if other is not None else None
    status = lib.logit_scores(logits.data_ptr(), other.data_ptr() if other is not None else None,
                              int(logits.dtype == torch.bfloat16), rows, vocab, logits.stride(0),
                              targets.data_ptr(), ce.data_ptr(),
                              other_ce.data_ptr() if other_ce is not None else None,
                              kl.data_ptr() if kl is not None else None, torch.get_num_threads())
    if status == -2:
        raise IndexError(f"a target token is outside the vocabulary of {vocab}")
    if status != 0:
        raise MemoryError("logit_scores could not allocate its scratch rows")
    return RowScores(ce, other_ce, kl)
