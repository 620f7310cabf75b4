"""Evaluation formulas on tiny hand-computed cases, their batch-size invariance, and the hook-point
rewrites (splice, zero, mean) that the downstream figures use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saeworks.eval import native_scores
from saeworks.eval.head import OutputHead
from saeworks.eval.metrics import (
    DOWNSTREAM_KEYS,
    RECONSTRUCTION_KEYS,
    VARIANTS,
    DownstreamAccumulator,
    ReconstructionAccumulator,
    kl_per_prediction,
    recovered,
)
from saeworks.sae import native
from saeworks.sae.config import SAEConfig
from saeworks.sae.interventions import ablate_mean, ablate_zero, splice_sae
from saeworks.sae.topk import TopKSAE

LN = math.log


def golden_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [2, 2], x_hat [2, 2], latents [2, 4] whose figures are worked out in the tests."""
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    latents = torch.tensor([[0.5, 0.0, 2.0, 0.0], [0.0, 0.0, 1.5, 0.0]])
    return x, x_hat, latents


def test_reconstruction_golden() -> None:
    rec = ReconstructionAccumulator(d_in=2, d_sae=4, dense_threshold=0.6)
    rec.update(*golden_rows())
    figures = rec.result()
    assert list(figures) == list(RECONSTRUCTION_KEYS)
    # squared errors 16 and 1; mean x = (2, 2), so sum ||x - mean||^2 = (1 + 4) + (1 + 4) = 10
    assert figures["mse"] == pytest.approx(17 / 2, rel=1e-12)
    assert figures["fvu"] == pytest.approx(17 / 10, rel=1e-12)
    # cos: 9 / (5 * 3) = 0.6 and 2 / (1 * 2) = 1; norm ratios 3 / 5 and 2 / 1
    assert figures["cosine"] == pytest.approx((0.6 + 1.0) / 2, rel=1e-12)
    assert figures["relative_norm"] == pytest.approx((0.6 + 2.0) / 2, rel=1e-12)
    # active latents 2 and 1; sums of activations 2.5 and 1.5
    assert figures["l0"] == pytest.approx(1.5, rel=1e-12)
    assert figures["l1"] == pytest.approx(2.0, rel=1e-12)
    # densities (0.5, 0, 1, 0): latents 1 and 3 dead, latent 2 above 0.6 dense
    assert rec.density.tolist() == [0.5, 0.0, 1.0, 0.0]
    assert (rec.n_tokens, rec.dead_count, rec.dense_count) == (2, 2, 1)
    assert figures["dead_fraction"] == 0.5
    assert figures["dense_fraction"] == 0.25
    assert rec.mean().tolist() == [2.0, 2.0]


def test_dense_threshold_is_strict() -> None:
    rec = ReconstructionAccumulator(2, 4, dense_threshold=0.5)
    rec.update(*golden_rows())
    assert rec.dense_count == 1  # density 0.5 is not above 0.5; 1.0 is


def test_fvu_survives_a_large_mean() -> None:
    """The variance is summed around a shift, so a mean 1e6 times the spread costs no precision."""
    x, x_hat, latents = golden_rows()
    rec = ReconstructionAccumulator(2, 4)
    rec.update(x.double() + 1e6, x_hat.double() + 1e6, latents)
    assert rec.result()["fvu"] == pytest.approx(17 / 10, rel=1e-9)
    assert rec.mean().tolist() == [1e6 + 2, 1e6 + 2]


def test_zero_rows_and_zero_reconstruction() -> None:
    rec = ReconstructionAccumulator(2, 1)
    rec.update(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2), torch.zeros(2, 1))
    figures = rec.result()
    assert figures["cosine"] == 0.0 and figures["relative_norm"] == 0.0
    assert figures["fvu"] == pytest.approx(5 / 2.5)  # errors 1 + 4; mean (0.5, 1): variance 0.5 + 2
    assert figures["dead_fraction"] == 1.0
    with pytest.raises(ValueError, match="no rows"):
        ReconstructionAccumulator(2, 1).result()


def test_reconstruction_is_batch_size_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=generator) * 3 + 5
    x_hat = x + 0.5 * torch.randn(1000, 16, generator=generator)
    latents = torch.relu(torch.randn(1000, 64, generator=generator) - 1.5)
    results = []
    for batch in (1000, 333, 7, 1):
        rec = ReconstructionAccumulator(16, 64, dense_threshold=0.05)
        for start in range(0, 1000, batch):
            rec.update(x[start:start + batch], x_hat[start:start + batch], latents[start:start + batch])
        results.append((rec.result(), rec.density, rec.mean()))
    reference, density, mean = results[0]
    for figures, other_density, other_mean in results[1:]:
        for key in RECONSTRUCTION_KEYS:
            assert figures[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
        assert torch.equal(other_density, density)
        torch.testing.assert_close(other_mean, mean, rtol=1e-12, atol=1e-12)


def test_active_latents_give_the_dense_figures() -> None:
    """`update_active` (k latents per row, as a TopK SAE keeps them) adds exactly what `update` adds
    for the same latents written densely: L0, L1, density and dead counts included."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=generator) * 3 + 5
    x_hat = x + 0.5 * torch.randn(300, 16, generator=generator)
    indices = torch.rand(300, 48, generator=generator).argsort(dim=1)[:, :5]  # distinct; 48-63 dead
    values = torch.relu(torch.randn(300, 5, generator=generator))  # some zeros: inactive
    dense = torch.zeros(300, 64).scatter_(1, indices, values)
    by_dense, by_active = ReconstructionAccumulator(16, 64), ReconstructionAccumulator(16, 64)
    for start in range(0, 300, 128):
        rows = slice(start, start + 128)
        by_dense.update(x[rows], x_hat[rows], dense[rows])
        by_active.update_active(x[rows], x_hat[rows], indices[rows], values[rows])
    assert by_active.result() == by_dense.result()
    assert torch.equal(by_active.active_count, by_dense.active_count)
    assert by_active.dead_count == by_dense.dead_count > 0
    with pytest.raises(ValueError, match="shapes disagree"):
        by_active.update_active(x[:3], x_hat[:3], indices[:3], values[:2])


def golden_logits() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One window of 4 tokens, vocabulary 2, first_kept 1: predictions at t = 1, 2 of tokens 1, 0.
    Positions 0 and 3 hold wild logits that must not count."""
    input_ids = torch.tensor([[0, 0, 1, 0]])

    def window(t1: list[float], t2: list[float]) -> torch.Tensor:
        return torch.tensor([[[90.0, -90.0], t1, t2, [-50.0, 50.0]]])

    l3, l7 = LN(3), LN(7)
    logits = {
        "clean": window([0, 0], [0, 0]),          # p = (1/2, 1/2) twice
        "spliced": window([l3, 0], [l3, 0]),      # p = (3/4, 1/4) twice
        "zero": window([0, l7], [0, l7]),         # p = (1/8, 7/8) twice
        "mean": window([l3, 0], [0, l3]),         # p = (3/4, 1/4), then (1/4, 3/4)
    }
    return input_ids, logits


def golden_downstream() -> dict[str, float]:
    ce_clean = LN(2)
    ce_spliced = (LN(4) + LN(4 / 3)) / 2    # -log 1/4 (token 1), -log 3/4 (token 0)
    ce_zero = (LN(8 / 7) + LN(8)) / 2       # -log 7/8, -log 1/8
    ce_mean = LN(4)                         # -log 1/4 twice
    kl = 0.5 * LN(0.5 / 0.75) + 0.5 * LN(0.5 / 0.25)  # the same at both predictions
    return {"ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero": ce_zero, "ce_mean": ce_mean,
            "ce_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean),
            "ce_recovered_mean": (ce_mean - ce_spliced) / (ce_mean - ce_clean), "kl": kl}


def test_downstream_golden() -> None:
    input_ids, logits = golden_logits()
    down = DownstreamAccumulator(first_kept=1)
    down.update(input_ids, logits["clean"], [(name, logits[name]) for name in ("spliced", "zero", "mean")])
    figures = down.result()
    assert list(figures) == list(DOWNSTREAM_KEYS)
    expected = golden_downstream()
    for key in DOWNSTREAM_KEYS:
        assert figures[key] == pytest.approx(expected[key], rel=1e-6), key
    assert down.n_predictions == 2


def test_downstream_reads_bf16_logits_in_float32() -> None:
    input_ids, logits = golden_logits()
    down, reference = DownstreamAccumulator(1), DownstreamAccumulator(1)
    rounded = {name: value.bfloat16() for name, value in logits.items()}
    down.update(input_ids, rounded["clean"], [(n, rounded[n]) for n in ("spliced", "zero", "mean")])
    as_float = {name: value.float() for name, value in rounded.items()}
    reference.update(input_ids, as_float["clean"], [(n, as_float[n]) for n in ("spliced", "zero", "mean")])
    assert down.result() == reference.result()


def test_downstream_needs_every_variant_once() -> None:
    input_ids, logits = golden_logits()
    with pytest.raises(ValueError, match="not given"):
        DownstreamAccumulator(1).update(input_ids, logits["clean"], [("spliced", logits["spliced"])])
    with pytest.raises(ValueError, match="repeated"):
        DownstreamAccumulator(1).update(input_ids, logits["clean"],
                                        [("zero", logits["zero"]), ("zero", logits["zero"])])
    with pytest.raises(ValueError, match="no prediction"):
        DownstreamAccumulator(3).update(input_ids, logits["clean"], [])


def test_downstream_is_batch_size_invariant() -> None:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 50, (12, 10), generator=generator)
    logits = {name: 4 * torch.randn(12, 10, 50, generator=generator)
              for name in ("clean", "spliced", "zero", "mean")}
    results = []
    for batch in (12, 5, 1):
        down = DownstreamAccumulator(first_kept=2)
        for start in range(0, 12, batch):
            part = {name: value[start:start + batch] for name, value in logits.items()}
            down.update(input_ids[start:start + batch], part["clean"],
                        ((name, part[name]) for name in ("spliced", "zero", "mean")))
        results.append(down.result())
        assert down.n_predictions == 12 * 7
    for figures in results[1:]:
        for key in DOWNSTREAM_KEYS:
            assert figures[key] == pytest.approx(results[0][key], rel=1e-9), key


def test_kl_and_recovered_helpers() -> None:
    log_p = torch.log(torch.tensor([0.5, 0.5, 0.0]))  # a zero-probability token adds nothing
    log_q = torch.log(torch.tensor([0.75, 0.25, 0.0]))
    assert float(kl_per_prediction(log_p, log_q)) == pytest.approx(0.5 * LN(4 / 3), rel=1e-6)
    assert float(kl_per_prediction(log_p, log_p)) == 0.0
    assert recovered(1.0, 1.5, 3.0) == pytest.approx(0.75)
    assert math.isnan(recovered(1.0, 1.5, 1.0))


def tiny_sae() -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=4, d_sae=8, k=2))
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return sae.eval()


def test_splice_replaces_only_positions_from_first_kept() -> None:
    sae = tiny_sae()
    activation = torch.randn(2, 5, 4)  # [batch, pos, d]
    before = activation.clone()
    with torch.no_grad():
        spliced = splice_sae(sae, first_kept=2)(activation)
        expected = sae(activation[:, 2:].reshape(-1, 4)).reshape(2, 3, 4)
    assert spliced is not None
    assert torch.equal(activation, before)  # not modified in place
    assert torch.equal(spliced[:, :2], activation[:, :2])
    torch.testing.assert_close(spliced[:, 2:], expected)


def test_splice_runs_the_sae_in_float32_and_keeps_the_dtype() -> None:
    sae = tiny_sae()
    activation = torch.randn(1, 4, 4).bfloat16()
    with torch.no_grad():
        spliced = splice_sae(sae, first_kept=1)(activation)
        expected = sae(activation[:, 1:].float()).bfloat16()
    assert spliced is not None and spliced.dtype == torch.bfloat16
    assert torch.equal(spliced[:, 1:], expected)
    assert torch.equal(spliced[:, :1], activation[:, :1])


def test_zero_and_mean_ablation() -> None:
    activation = torch.randn(3, 4, 2)
    zeroed = ablate_zero(first_kept=1)(activation)
    mean = torch.tensor([1.5, -2.0], dtype=torch.float64)
    filled = ablate_mean(mean, first_kept=3)(activation.half())
    assert zeroed is not None and filled is not None
    assert torch.equal(zeroed[:, :1], activation[:, :1]) and not zeroed[:, 1:].any()
    assert filled.dtype == torch.float16
    assert torch.equal(filled[:, :3], activation[:, :3].half())
    assert torch.equal(filled[:, 3:], mean.half().expand(3, 1, 2))


# eval/head.py: the output head applied a few rows at a time, scored as the full logits are.

def _head_case(vocab: int = 300, d: int = 24) -> tuple[torch.nn.Linear, torch.Tensor,
                                                       dict[str, torch.Tensor]]:
    torch.manual_seed(5)
    linear = torch.nn.Linear(d, vocab, bias=True)
    input_ids = torch.randint(0, vocab, (3, 17))
    hidden = {name: torch.randn(3, 17, d) * 2 for name in ("clean", "spliced", "zero", "mean")}
    return linear, input_ids, hidden


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_scoring_the_heads_input_equals_scoring_its_logits(rows: int) -> None:
    """update_head_inputs (logits `rows` predictions at a time into reused buffers) gives update's
    CE and KL on the full logits, whatever the chunking (one row, uneven chunks, one chunk)."""
    linear, input_ids, hidden = _head_case()
    head = OutputHead(linear)
    head.rows = rows
    by_logits, by_head = DownstreamAccumulator(2), DownstreamAccumulator(2)
    with torch.no_grad():
        logits = {name: linear(h) for name, h in hidden.items()}
    by_logits.update(input_ids, logits["clean"], [(n, logits[n]) for n in ("spliced", "zero", "mean")])
    edited = {n: hidden[n] for n in ("spliced", "zero", "mean")}
    by_head.update_head_inputs(input_ids, hidden["clean"], edited, head)
    assert by_head.n_predictions == by_logits.n_predictions == 3 * 14
    assert by_head.result() == pytest.approx(by_logits.result(), rel=1e-5)
    with pytest.raises(ValueError, match="expected each of"):
        by_head.update_head_inputs(input_ids, hidden["clean"], {"spliced": hidden["spliced"]}, head)


def test_the_head_is_used_only_where_it_is_the_models_whole_head() -> None:
    """OutputHead.of: a plain nn.Linear head, no logit transform in the config; `matches` catches a
    model whose logits are not that linear map of the head's input."""
    linear, _, hidden = _head_case()

    class Model(torch.nn.Module):
        def __init__(self, head: torch.nn.Module, **config: float) -> None:
            super().__init__()
            self.head = head
            self.config = type("Config", (), config)()

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    assert OutputHead.of(Model(linear)) is not None
    assert OutputHead.of(Model(linear, final_logit_softcapping=30.0)) is None  # Gemma 2's softcap
    assert OutputHead.of(Model(linear, logit_scale=0.0625)) is None
    assert OutputHead.of(Model(linear, logit_scale=1.0)) is not None
    assert OutputHead.of(Model(torch.nn.Sequential(linear))) is None
    head = OutputHead(linear)
    with torch.no_grad():
        logits = linear(hidden["clean"])
    assert head.matches(hidden["clean"], logits)
    assert not head.matches(hidden["clean"], 30 * torch.tanh(logits / 30))  # a softcap the config hid
    assert not head.matches(hidden["clean"], logits[..., :-1])


needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler: torch ops only")


def _log_softmax_scores(x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE of x, CE of y, KL(p_x || p_y)) per row by the log-softmax formulas, in float64."""
    log_p, log_q = F.log_softmax(x.double(), dim=-1), F.log_softmax(y.double(), dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
    return -log_p.gather(1, targets[:, None]).squeeze(1), -log_q.gather(1, targets[:, None]).squeeze(1), kl


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1003, 4096])
def test_native_logit_scores_equal_the_log_softmax_formulas(dtype: torch.dtype, vocab: int) -> None:
    """The kernel's CE and KL per row = the log-softmax forms, for float32 and bfloat16 rows, a
    vocabulary that is not a multiple of the vector width, rows of a strided view, a -inf logit
    (p = 0: adds nothing to the KL) and one where only the second row has -inf (KL infinite)."""
    generator = torch.Generator().manual_seed(5)
    base = (3 * torch.randn(40, vocab, generator=generator)).to(dtype)
    other = (base.float() + torch.randn(40, vocab, generator=generator)).to(dtype)
    base[0, 7] = other[0, 7] = float("-inf")
    base[2, 11] = float("-inf")
    other[4, int(base[4].float().argmax())] = float("-inf")  # row 2 of the view: its KL is infinite
    x, y = base[::2], other[::2]  # [20, vocab], row stride 2 * vocab
    targets = torch.randint(0, vocab, (20,), generator=generator)
    targets[1] = 11  # row 1 is base[2]: its target's logit is -inf
    scores = native_scores.logit_scores(x, targets, y)
    assert scores is not None and scores.other_ce is not None and scores.kl is not None
    ce, other_ce, kl = _log_softmax_scores(x.float(), y.float(), targets)
    assert math.isinf(float(scores.ce[1])) and math.isinf(float(ce[1]))
    finite = torch.arange(20) != 1
    torch.testing.assert_close(scores.ce[finite], ce[finite], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scores.other_ce, other_ce, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scores.kl, kl, rtol=1e-5, atol=1e-5)
    assert math.isinf(float(scores.kl[2])) and scores.kl[finite & (torch.arange(20) != 2)].min() > 0
    alone = native_scores.logit_scores(x, targets)
    assert alone is not None and alone.other_ce is None and torch.equal(alone.ce, scores.ce)


@needs_compiler
def test_native_logit_scores_take_the_kl_to_infinity_where_the_other_rules_a_token_out() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0] * 8])
    y = x.clone()
    y[0, 3] = float("-inf")  # p(3) > 0 under x, 0 under y
    scores = native_scores.logit_scores(x, torch.tensor([0]), y)
    assert scores is not None and scores.kl is not None and math.isinf(float(scores.kl[0]))


@needs_compiler
def test_native_logit_scores_name_a_target_outside_the_vocabulary() -> None:
    with pytest.raises(IndexError, match="outside the vocabulary of 32"):
        native_scores.logit_scores(torch.randn(3, 32), torch.tensor([0, 32, 1]))


@needs_compiler
def test_downstream_figures_are_the_same_native_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 300, (4, 12), generator=generator)
    logits = {name: (4 * torch.randn(4, 12, 300, generator=generator)).bfloat16()
              for name in ("clean", "spliced", "zero", "mean")}
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("SAEWORKS_NATIVE", setting)
        down = DownstreamAccumulator(first_kept=2)
        down.update(input_ids, logits["clean"], [(name, logits[name]) for name in VARIANTS])
        results.append(down.result())
    for key in DOWNSTREAM_KEYS:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), key
