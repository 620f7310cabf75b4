"""Evaluation figures of an SAE, accumulated batch by batch: reconstruction, sparsity, downstream.

Every figure is a sum over tokens (or next-token predictions) kept in float64 and divided once at
the end, so it does not depend on how rows or windows are batched. Per-token quantities are
computed in float64 from the activations (float32 for the sums over latents and over the
vocabulary, which stay within one token and so are the same whatever the batch).

Over N evaluated tokens with activations x [N, d_in], reconstructions x_hat and latents f [N, d_sae]:

    mse            Σ_tokens ||x - x_hat||² / N
    fvu            Σ ||x - x_hat||² / Σ ||x - mean(x)||²        (mean over the N tokens)
    cosine         mean of cos(x, x_hat)
    relative_norm  mean of ||x_hat|| / ||x||                    (< 1: shrinkage)
    l0, l1         mean of #{f > 0}, mean of Σ |f|
    density        #{tokens with f_i > 0} / N per latent; dead: density 0; dense: > threshold

Downstream, over the predictions logits[:, t] -> token t + 1 for t in [first_kept, context - 2]:
ce_clean, ce_spliced (SAE reconstruction at the hook), ce_zero, ce_mean (ablations),
ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean), ce_recovered_mean (the same with
ce_mean), kl = mean KL(p_clean || p_spliced).

On a CPU the scoring is a native kernel (eval/native_scores.py): each prediction's logsumexp, the
target's logit and the KL terms in two passes over its row, nothing written. Elsewhere it reads the
logits in chunks of a few predictions (SCORE_CHUNK_ELEMENTS): each chunk's float32 log-softmax, the
target's log-probability and the KL terms live in cache-sized buffers, never as [predictions,
vocab] copies, and the clean chunk's log-softmax serves both its CE and the KL. Either way each
prediction's value is computed within its own row (row-wise ops), so it does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from saeworks.eval.native_scores import logit_scores

if TYPE_CHECKING:
    from saeworks.eval.head import OutputHead

RECONSTRUCTION_KEYS = ("mse", "fvu", "cosine", "relative_norm", "l0", "l1", "dead_fraction",
                       "dense_fraction")
DOWNSTREAM_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "ce_recovered", "ce_recovered_mean",
                   "kl")
VARIANTS = ("spliced", "zero", "mean")
"""The rewritten forwards compared with the clean one: SAE spliced in, zero- and mean-ablated."""

SCORE_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
"""Logits scored at once, by device type. On a CPU 4 MiB of float32 (21 predictions of a 49k
vocabulary): the chunk's float32 copies stay in cache, and each op is still large enough that two
threads on a shared machine do not stall at its barrier (2^18 was faster on one thread, several
times slower on two busy ones; measured 2.6-3.5 s against 7 s for whole-batch scoring of four
variants of 2,000 predictions). On a GPU large chunks, so kernel launches do not dominate."""


_TINY = 1e-30
"""Guards divisions by a zero norm (an all-zero row or reconstruction)."""


class ReconstructionAccumulator:
    """Streaming reconstruction and sparsity figures of one SAE over batches of rows."""

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = 0.1) -> None:
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self.shift: torch.Tensor | None = None
        """[d_in] float64: mean of the first batch; sums are of x - shift, which keeps the
        variance Σx² - (Σx)²/N free of cancellation when the mean is large."""
        self.sum_shifted = torch.zeros(d_in, dtype=torch.float64)  # Σ (x - shift)
        self.sum_sq_shifted = torch.zeros(d_in, dtype=torch.float64)  # Σ (x - shift)²
        self.sums = torch.zeros(5, dtype=torch.float64)  # Σ sq_error, cosine, relative_norm, l0, l1
        self.active_count = torch.zeros(d_sae, dtype=torch.int64)  # tokens where each latent is > 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor) -> None:
        """Add rows: x, x_hat [rows, d_in] (raw activation space), latents [rows, d_sae]."""
        if x.shape != x_hat.shape or x.shape[0] != latents.shape[0]:
            raise ValueError(f"shapes disagree: x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)}, "
                             f"latents {tuple(latents.shape)}")
        if x.shape[0] == 0:
            return
        active = latents > 0  # [rows, d_sae]
        self._add(x, x_hat, active.sum(dim=1).double(), latents.abs().sum(dim=1, dtype=torch.float64),
                  active.sum(dim=0).cpu())

    @torch.no_grad()
    def update_active(self, x: torch.Tensor, x_hat: torch.Tensor, indices: torch.Tensor,
                      values: torch.Tensor) -> None:
        """`update` for an SAE that keeps a few latents per row: values [rows, k] (>= 0; zeros are
        inactive) at latents indices [rows, k], never a dense [rows, d_sae] tensor."""
        if x.shape != x_hat.shape or x.shape[0] != values.shape[0] or values.shape != indices.shape:
            raise ValueError(f"shapes disagree: x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)}, "
                             f"indices {tuple(indices.shape)}, values {tuple(values.shape)}")
        if x.shape[0] == 0:
            return
        active = values > 0  # [rows, k]
        counts = torch.bincount(indices[active], minlength=self.active_count.shape[0])
        self._add(x, x_hat, active.sum(dim=1).double(), values.abs().sum(dim=1, dtype=torch.float64),
                  counts.cpu())

    def _add(self, x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor, l1: torch.Tensor,
             counts: torch.Tensor) -> None:
        """Add rows given their per-row L0 and L1 [rows] and per-latent active counts [d_sae]."""
        x64, x_hat64 = x.double(), x_hat.double()  # [rows, d_in]
        if self.shift is None:
            self.shift = x64.mean(dim=0).cpu()
        shifted = x64 - self.shift.to(x64.device)
        x_norm, x_hat_norm = x64.norm(dim=1), x_hat64.norm(dim=1)  # [rows]
        per_token = torch.stack([
            (x64 - x_hat64).pow(2).sum(dim=1),
            (x64 * x_hat64).sum(dim=1) / (x_norm * x_hat_norm).clamp_min(_TINY),
            x_hat_norm / x_norm.clamp_min(_TINY),
            l0,
            l1,
        ])  # [5, rows]
        self.sums += per_token.sum(dim=1).cpu()
        self.sum_shifted += shifted.sum(dim=0).cpu()
        self.sum_sq_shifted += shifted.pow(2).sum(dim=0).cpu()
        self.active_count += counts
        self.n_tokens += int(x.shape[0])

    def mean(self) -> torch.Tensor:
        """[d_in] float64: the mean activation of the rows seen (what mean-ablation writes)."""
        self._require_tokens()
        assert self.shift is not None
        return self.shift + self.sum_shifted / self.n_tokens

    @property
    def density(self) -> torch.Tensor:
        """[d_sae] float64: fraction of the rows seen where each latent is active."""
        return self.active_count.double() / max(self.n_tokens, 1)

    @property
    def dead_count(self) -> int:
        """Latents never active on the rows seen."""
        return int((self.active_count == 0).sum())

    @property
    def dense_count(self) -> int:
        """Latents active on more than `dense_threshold` of the rows seen."""
        return int((self.density > self.dense_threshold).sum())

    def result(self) -> dict[str, float]:
        """The figures of RECONSTRUCTION_KEYS over every row seen."""
        self._require_tokens()
        n = self.n_tokens
        sq_error, cosine, relative_norm, l0, l1 = (float(s) for s in self.sums)
        total_variance = float((self.sum_sq_shifted - self.sum_shifted.pow(2) / n).sum())
        d_sae = self.active_count.numel()
        return {
            "mse": sq_error / n,
            "fvu": sq_error / total_variance if total_variance > 0 else float("nan"),
            "cosine": cosine / n,
            "relative_norm": relative_norm / n,
            "l0": l0 / n,
            "l1": l1 / n,
            "dead_fraction": self.dead_count / d_sae,
            "dense_fraction": self.dense_count / d_sae,
        }

    def _require_tokens(self) -> None:
        if self.n_tokens == 0:
            raise ValueError("no rows were evaluated")


def prediction_targets(input_ids: torch.Tensor, first_kept: int) -> torch.Tensor:
    """[windows, context] -> [windows, predictions]: the tokens t + 1 predicted at t >= first_kept."""
    return input_ids[:, first_kept + 1:]


def prediction_log_probs(logits: torch.Tensor, first_kept: int) -> torch.Tensor:
    """[windows, context, vocab] -> [windows, predictions, vocab] float32 log-probabilities of the
    predictions made at positions first_kept .. context - 2 (float32 even for a bf16 model)."""
    return F.log_softmax(logits[:, first_kept:-1].float(), dim=-1)


def kl_per_prediction(clean_log_probs: torch.Tensor, other_log_probs: torch.Tensor) -> torch.Tensor:
    """[..., vocab] x2 -> [...]: KL(p_clean || p_other) = Σ_v p_clean (log p_clean - log p_other)."""
    p_clean = clean_log_probs.exp()
    difference = clean_log_probs - other_log_probs
    kl = torch.linalg.vecdot(p_clean, difference)  # the sum over the vocabulary, no product kept
    undefined = kl.isnan()
    if undefined.any():  # a token with p_clean = 0 adds nothing, even where log p_clean = -inf
        terms = torch.where(p_clean[undefined] > 0, p_clean[undefined] * difference[undefined], 0.0)
        kl[undefined] = terms.sum(dim=-1)
    return kl


def _nll_sum(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ -log p(target) over every prediction, in float64 (a 0-d tensor on the logits' device)."""
    picked = log_probs.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)  # [..., predictions]
    return -picked.double().sum()


def _window_chunks(logits: torch.Tensor) -> Iterator[slice]:
    """The prediction blocks of one window of `logits` [windows, predictions, vocab], each
    contiguous in memory and of about SCORE_CHUNK_ELEMENTS logits."""
    _, n_predictions, vocab = logits.shape
    rows = max(1, SCORE_CHUNK_ELEMENTS.get(logits.device.type, 1 << 20) // vocab)
    for start in range(0, n_predictions, rows):
        yield slice(start, start + rows)


def score_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ -log p(target) (float64, 0-d) of logits [windows, predictions, vocab] (any float dtype,
    read in float32) against targets [windows, predictions]: a window at a time by the native
    kernel (eval/native_scores.py), else chunk by chunk as logsumexp(logits) minus the target's
    logit (no log-probabilities written: 96 against 219 ms for the log-softmax and its gather,
    [16, 127, 49152] bfloat16 logits, 2 threads)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for window in range(logits.shape[0]):
        scores = logit_scores(logits[window], targets[window])
        if scores is not None:
            total += scores.ce.sum()
            continue
        for rows in _window_chunks(logits):
            chunk = logits[window, rows].float()  # [rows, vocab]
            picked = chunk.gather(-1, targets[window, rows].unsqueeze(-1).long()).squeeze(-1)  # [rows]
            total += (torch.logsumexp(chunk, dim=-1) - picked).double().sum()
    return total


def score_ce_and_kl(clean: torch.Tensor, other: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ CE of clean, Σ CE of other, Σ KL(p_clean || p_other)), float64 0-d, of two [windows,
    predictions, vocab] logits against targets [windows, predictions]: a window at a time by the
    native kernel (two passes over each row, no log-probabilities written: 10 against ~65 ms for
    300 predictions of a 49k vocabulary, 2 threads), else in one pass of torch chunks."""
    sums = torch.zeros(3, dtype=torch.float64, device=clean.device)
    for window in range(clean.shape[0]):
        scores = logit_scores(clean[window], targets[window], other[window])
        if scores is not None and scores.other_ce is not None and scores.kl is not None:
            sums += torch.stack([scores.ce.sum(), scores.other_ce.sum(), scores.kl.sum()])
            continue
        for rows in _window_chunks(clean):
            log_p = F.log_softmax(clean[window, rows].float(), dim=-1)  # [rows, vocab]
            log_q = F.log_softmax(other[window, rows].float(), dim=-1)
            chunk_targets = targets[window, rows]
            sums += torch.stack([_nll_sum(log_p, chunk_targets), _nll_sum(log_q, chunk_targets),
                                 kl_per_prediction(log_p, log_q).double().sum()])
    return sums[0], sums[1], sums[2]


class DownstreamAccumulator:
    """Streaming next-token cross-entropy of the clean and rewritten forwards, and KL to clean.

    Positions before `first_kept` are neither rewritten nor scored as predictors: the first
    prediction is logits[:, first_kept] of token first_kept + 1.
    """

    def __init__(self, first_kept: int) -> None:
        if first_kept < 0:
            raise ValueError(f"first_kept must be non-negative, got {first_kept}")
        self.first_kept = first_kept
        self.n_predictions = 0
        self.sum_ce = dict.fromkeys(("clean", *VARIANTS), 0.0)
        self.sum_kl = 0.0  # Σ KL(p_clean || p_spliced)

    @torch.no_grad()
    def update(self, input_ids: torch.Tensor, clean_logits: torch.Tensor,
               variant_logits: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Add windows: input_ids [windows, context], logits [windows, context, vocab] of the clean
        forward, and (name, logits) of each of VARIANTS. A lazy iterable (a generator running each
        forward in turn) keeps only one variant's logits in memory at a time."""
        if input_ids.shape[1] < self.first_kept + 2:
            raise ValueError(f"windows of {input_ids.shape[1]} tokens hold no prediction from position "
                             f"{self.first_kept} on")
        targets = prediction_targets(input_ids, self.first_kept).to(clean_logits.device)
        clean = clean_logits[:, self.first_kept:-1]  # [windows, predictions, vocab], a view
        sums: dict[str, torch.Tensor] = {}
        kl = torch.zeros((), dtype=torch.float64)
        for name, logits in variant_logits:
            if name not in VARIANTS or name in sums:
                raise ValueError(f"unexpected or repeated variant {name!r}; expected each of {VARIANTS}")
            predictions = logits[:, self.first_kept:-1]
            if name == "spliced":  # the clean chunk's log-softmax serves its CE and the KL
                sums["clean"], sums[name], kl = score_ce_and_kl(clean, predictions, targets)
            else:
                sums[name] = score_ce(predictions, targets)
        missing = [name for name in VARIANTS if name not in sums]
        if missing:
            raise ValueError(f"variants {missing} were not given")
        for name, value in sums.items():
            self.sum_ce[name] += float(value)
        self.sum_kl += float(kl)
        self.n_predictions += targets.numel()

    @torch.no_grad()
    def update_head_inputs(self, input_ids: torch.Tensor, clean: torch.Tensor,
                           variants: Mapping[str, torch.Tensor], head: OutputHead) -> None:
        """`update` from the output head's inputs [windows, context, d] of the clean forward and of
        each of VARIANTS, the logits made `head.rows` predictions at a time (eval/head.py): the
        clean and spliced chunks side by side (CE of both, KL), then each ablation's."""
        if input_ids.shape[1] < self.first_kept + 2:
            raise ValueError(f"windows of {input_ids.shape[1]} tokens hold no prediction from position "
                             f"{self.first_kept} on")
        if sorted(variants) != sorted(VARIANTS):
            raise ValueError(f"variants {sorted(variants)} given; expected each of {VARIANTS}")
        targets = prediction_targets(input_ids, self.first_kept).reshape(1, -1)  # [1, predictions]
        rows = {name: h[:, self.first_kept:-1].reshape(-1, h.shape[-1])  # [predictions, d]
                for name, h in {"clean": clean, **variants}.items()}
        sums = dict.fromkeys(("clean", *VARIANTS), torch.zeros((), dtype=torch.float64))
        kl = torch.zeros((), dtype=torch.float64)
        for start in range(0, targets.shape[1], head.rows):
            block = slice(start, start + head.rows)
            chunk_targets = targets[:, block].to(head.weight.device)
            clean_logits = head.logits(rows["clean"][block], 0)[None]  # [1, rows, vocab]
            spliced_logits = head.logits(rows["spliced"][block], 1)[None]
            ce_clean, ce_spliced, chunk_kl = score_ce_and_kl(clean_logits, spliced_logits, chunk_targets)
            sums["clean"], sums["spliced"], kl = sums["clean"] + ce_clean.cpu(), \
                sums["spliced"] + ce_spliced.cpu(), kl + chunk_kl.cpu()
            for name in VARIANTS:
                if name != "spliced":
                    ablated_logits = head.logits(rows[name][block], 1)[None]
                    sums[name] = sums[name] + score_ce(ablated_logits, chunk_targets).cpu()
        for name, value in sums.items():
            self.sum_ce[name] += float(value)
        self.sum_kl += float(kl)
        self.n_predictions += targets.numel()

    def result(self) -> dict[str, float]:
        """The figures of DOWNSTREAM_KEYS over every prediction seen."""
        if self.n_predictions == 0:
            raise ValueError("no predictions were evaluated")
        ce = {name: total / self.n_predictions for name, total in self.sum_ce.items()}
        return {
            "ce_clean": ce["clean"],
            "ce_spliced": ce["spliced"],
            "ce_zero": ce["zero"],
            "ce_mean": ce["mean"],
            "ce_recovered": recovered(ce["clean"], ce["spliced"], ce["zero"]),
            "ce_recovered_mean": recovered(ce["clean"], ce["spliced"], ce["mean"]),
            "kl": self.sum_kl / self.n_predictions,
        }


def recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean): 1 is as good as clean, 0 as ablating
    (NaN when ablating changes nothing)."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else float("nan")
