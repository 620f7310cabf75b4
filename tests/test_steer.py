"""Interventions and steered generation on the embedded model, with the tiny run's real SAE and
dictionary: exact identities (neutral settings change nothing, clamp to 0 is zero-ablation, an
ablation leaves the positions where a feature is silent bit for bit, a cached generation equals
the same intervention over the finished sequence) and real effects (steering moves the
probability of the token a feature promotes)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from saeworks.activations.hooks import capture_activations, hooks_attached
from saeworks.eval.dictionary import FeatureDictionary, FeatureNotFoundError
from saeworks.sae.errors import SaeworksError
from saeworks.steer.generate import decode, generate, prompt_ids, side_by_side
from saeworks.steer.interventions import (
    FeatureIntervention,
    FeatureSource,
    InterventionError,
    VectorIntervention,
    intervene,
)
from saeworks.steer.positions import PositionError, Positions
from saeworks.steer.settings import GenerationError, GenerationSettings
from saeworks.steer.spec import parse_feature, parse_vector
from tests.eval_helpers import TINY_HOOK
from tests.test_hooks import CASES, _model

PROMPT = "The Python interpreter reads a script and"
OTHER_HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def dictionary(tiny_dictionary: Path) -> FeatureDictionary:
    return FeatureDictionary.open(tiny_dictionary, readonly=True)


@pytest.fixture(scope="module")
def source(dictionary: FeatureDictionary) -> FeatureSource:
    return FeatureSource.from_dictionary(dictionary)


@pytest.fixture(scope="module")
def ids(embedded_tokenizer: Any) -> torch.Tensor:
    return torch.tensor([prompt_ids(embedded_tokenizer, PROMPT, True)])


def logits_of(model: Any, ids: torch.Tensor, interventions: list[Any]) -> torch.Tensor:
    with torch.no_grad(), intervene(model, interventions):
        return model(ids).logits[0].float()


def hook_activation(model: Any, ids: torch.Tensor, interventions: list[Any], hook: str = TINY_HOOK
                    ) -> torch.Tensor:
    """The activation at `hook` as the rest of the model sees it (after the interventions)."""
    with intervene(model, interventions):
        return capture_activations(model, ids, [hook])[hook][0].float()


def live_features(source: FeatureSource, model: Any, ids: torch.Tensor) -> torch.Tensor:
    """[pos, d_sae] the SAE's latents on the prompt's clean activations."""
    x = capture_activations(model, ids, [TINY_HOOK])[TINY_HOOK][0].float()
    with torch.no_grad():
        return source.sae.encode(x)


def hf_generate(model: Any, tokenizer: Any, row: list[int], settings: GenerationSettings) -> list[int]:
    torch.manual_seed(settings.seed)
    input_ids = torch.tensor([row])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=not settings.greedy,
                         max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         **({} if settings.greedy else {"temperature": settings.temperature,
                                                         "top_p": settings.top_p}))
    return out[0, len(row):].tolist()


SAMPLED = GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)


def test_no_intervention_and_neutral_settings_equal_plain_generate(
        embedded_model: Any, embedded_tokenizer: Any, source: FeatureSource) -> None:
    """Token for token the output of `model.generate` with the same seed: with no intervention and
    with every method at its neutral setting."""
    row = prompt_ids(embedded_tokenizer, PROMPT, True)
    expected = hf_generate(embedded_model, embedded_tokenizer, row, SAMPLED)
    neutral = [[],
               [FeatureIntervention(source, 3, "additive", 0.0)],
               [FeatureIntervention(source, 3, "orthogonal", 1.0)],
               [FeatureIntervention(source, 3, "projection_cap", 1e6)],
               [VectorIntervention(TINY_HOOK, torch.randn(576), "additive", 0.0)]]
    for interventions in neutral:
        completion = generate(embedded_model, embedded_tokenizer, PROMPT, interventions, SAMPLED)[0]
        assert completion.token_ids == expected, interventions
    assert len(expected) == SAMPLED.max_new_tokens


def test_splicing_the_sae_with_its_error_term_is_the_clean_forward(
        embedded_model: Any, ids: torch.Tensor, source: FeatureSource) -> None:
    sae = source.sae

    def splice_with_error(h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        return (sae(x) + (x - sae(x))).to(h.dtype)

    with torch.no_grad():
        clean = embedded_model(ids).logits
        with hooks_attached(embedded_model, {TINY_HOOK: splice_with_error}):
            spliced = embedded_model(ids).logits
    # float32 rounding only: SAE(h) + (h - SAE(h)) differs from h by ~1e-7 of the activation's scale
    assert float((spliced - clean).abs().max() / clean.abs().max()) < 1e-5


def test_additive_steering_moves_the_promoted_token_monotonically(
        embedded_model: Any, ids: torch.Tensor, late_dictionary: Path) -> None:
    """The feature (of an SAE at layer 24) whose decoder row most promotes one token: adding it
    raises that token's probability at the next position step by step, subtracting it lowers it."""
    with FeatureDictionary.open(late_dictionary, readonly=True) as late:
        source = FeatureSource.from_dictionary(late)
        best = max((late.feature(i) for i in range(len(late))), key=lambda f: f.logit_positive[0][1])
        (token,) = late.token_ids(best.logit_positive[0][0])[:1]
    probability = []
    for c in (-1.0, -0.5, 0.0, 0.5, 1.0):
        logits = logits_of(embedded_model, ids, [FeatureIntervention(source, best.id, "additive", c)])
        probability.append(float(logits[-1].softmax(-1)[token]))
    assert all(a < b for a, b in itertools.pairwise(probability)), probability
    assert probability[-1] > 1.5 * probability[2] and probability[0] < probability[2] / 1.5, probability


def test_clamp_to_zero_is_zero_ablation_and_keeps_the_error_term(
        embedded_model: Any, ids: torch.Tensor, source: FeatureSource) -> None:
    latents = live_features(source, embedded_model, ids)
    feature = int(latents[2:].amax(dim=0).argmax())  # fires on the prompt
    clean = capture_activations(embedded_model, ids, [TINY_HOOK])[TINY_HOOK][0].float()
    sae = source.sae
    with torch.no_grad():
        zeroed = sae.encode(clean)
        zeroed[:, feature] = 0
        by_formula = sae.decode(zeroed) + (clean - sae(clean))  # SAE(h, f clamped) + error
    clamped = hook_activation(embedded_model, ids, [FeatureIntervention(source, feature, "clamp", 0.0)])
    ablated = hook_activation(embedded_model, ids, [FeatureIntervention(source, feature, "zero")])
    kept = source.first_kept
    torch.testing.assert_close(clamped[kept:], by_formula[kept:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(clamped, ablated, atol=1e-6, rtol=0)
    assert torch.equal(clamped[:kept], clean[:kept])  # BOS and the attention sink untouched


def test_ablation_leaves_silent_positions_bit_for_bit_and_changes_active_ones(
        embedded_model: Any, ids: torch.Tensor, source: FeatureSource) -> None:
    latents = live_features(source, embedded_model, ids)
    active = latents[:, :] > 0
    kept = source.first_kept
    counts = active[kept:].sum(dim=0)
    feature = int(torch.nonzero((counts > 0) & (counts < active.shape[0] - kept - 1))[0])
    clean = capture_activations(embedded_model, ids, [TINY_HOOK])[TINY_HOOK][0].float()
    for method in ("zero", "mean"):
        edited = hook_activation(embedded_model, ids, [FeatureIntervention(source, feature, method)])
        fired = active[:, feature].clone()
        fired[:kept] = False
        if method == "zero":
            assert torch.equal(edited[~fired], clean[~fired])
        assert not torch.equal(edited[fired], clean[fired])
    clean_logits = logits_of(embedded_model, ids, [])
    ablated_logits = logits_of(embedded_model, ids, [FeatureIntervention(source, feature, "zero")])
    first_fired = int(torch.nonzero(fired)[0])
    assert torch.equal(ablated_logits[:first_fired], clean_logits[:first_fired])  # causal: before it, nothing
    assert not torch.allclose(ablated_logits[first_fired], clean_logits[first_fired])


def test_resample_from_the_same_input_changes_nothing(
        embedded_model: Any, ids: torch.Tensor, source: FeatureSource) -> None:
    latents = live_features(source, embedded_model, ids)
    feature = int(latents[2:].amax(dim=0).argmax())
    same = FeatureIntervention(source, feature, "resample", resample_from=ids[0])
    assert torch.equal(logits_of(embedded_model, ids, [same]), logits_of(embedded_model, ids, []))
    other = torch.tensor(ids[0].tolist()[:2] + [7] * (ids.shape[1] - 2))
    changed = FeatureIntervention(source, feature, "resample", resample_from=other)
    assert not torch.equal(logits_of(embedded_model, ids, [changed]), logits_of(embedded_model, ids, []))


def test_two_hooks_at_once_compose(embedded_model: Any, ids: torch.Tensor, source: FeatureSource) -> None:
    """A feature at layer 3 and a raw vector at layer 6 together: layer 6 sees the layer-3 edit's
    downstream activation plus its own vector, exactly."""
    first = FeatureIntervention(source, 5, "additive", 2.0)
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    second = VectorIntervention(OTHER_HOOK, vector, "additive", 3.0, first_kept=source.first_kept)
    with torch.no_grad():
        upstream_only = hook_activation(embedded_model, ids, [first], OTHER_HOOK)
        both = hook_activation(embedded_model, ids, [first, second], OTHER_HOOK)
        none = hook_activation(embedded_model, ids, [], OTHER_HOOK)
    kept = source.first_kept
    torch.testing.assert_close(both[kept:], upstream_only[kept:] + 3.0 * vector, atol=1e-5, rtol=0)
    assert torch.equal(both[:kept], none[:kept])
    assert not torch.allclose(upstream_only[kept:], none[kept:])


def test_a_raw_vector_equals_the_feature_it_holds(embedded_model: Any, ids: torch.Tensor,
                                                   source: FeatureSource, tmp_path: Path) -> None:
    feature, coefficient = 9, 1.5
    path = tmp_path / "v.safetensors"
    save_file({"direction": source.sae.W_dec[feature].detach().clone()}, path)
    vector = parse_vector(f"{path}@{TINY_HOOK}=+{coefficient * source.unit(feature)}")
    vector = VectorIntervention(vector.hook, vector.vector, "additive", vector.coefficient,
                                first_kept=source.first_kept)
    as_feature = FeatureIntervention(source, feature, "additive", coefficient)
    torch.testing.assert_close(logits_of(embedded_model, ids, [vector]),
                               logits_of(embedded_model, ids, [as_feature]), atol=1e-4, rtol=0)
    raw = FeatureIntervention(source, feature, "additive", coefficient * source.unit(feature), raw=True)
    assert torch.equal(logits_of(embedded_model, ids, [raw]), logits_of(embedded_model, ids, [as_feature]))


def test_projection_methods(source: FeatureSource) -> None:
    from saeworks.sae.interventions import cap_projection, scale_projection

    g = torch.Generator().manual_seed(0)
    h, u = torch.randn(5, 8, generator=g), torch.randn(8, generator=g)
    u = u / u.norm()
    capped = cap_projection(h, u, 0.1)
    assert (capped @ u <= 0.1 + 1e-6).all()
    below = h @ u <= 0.1
    assert torch.equal(capped[below], h[below])
    projector = torch.outer(u, u)
    expected = h @ (torch.eye(8) - projector) + 0.3 * h @ projector  # (I - P)h + c·Ph
    torch.testing.assert_close(scale_projection(h, u, 0.3), expected)


def test_cached_generation_equals_the_intervention_over_the_whole_sequence(
        embedded_model: Any, embedded_tokenizer: Any, source: FeatureSource) -> None:
    """Each cached step is steered at its own position: the log-probabilities recorded while
    generating equal one uncached forward of the finished sequence under the same interventions."""
    settings = GenerationSettings(max_new_tokens=8, temperature=0, n_logprobs=0)
    for positions in (Positions(), Positions("generated"), Positions.at([3, -1])):
        interventions = [FeatureIntervention(source, 11, "additive", 3.0, positions=positions),
                         FeatureIntervention(source, 12, "clamp", 0.5, positions=positions)]
        completion = generate(embedded_model, embedded_tokenizer, PROMPT, interventions, settings)[0]
        sequence = torch.tensor([completion.prompt_ids + completion.token_ids])
        n = len(completion.prompt_ids)
        with torch.no_grad(), intervene(embedded_model, interventions, prompt_length=n):
            logprobs = embedded_model(sequence).logits[0].float().log_softmax(-1)
        expected = logprobs[n - 1:-1].gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        recorded = torch.tensor([t.logprob for t in completion.logprobs])
        torch.testing.assert_close(recorded, expected, atol=2e-4, rtol=0)


def test_generated_positions_leave_the_prompt_alone(embedded_model: Any, embedded_tokenizer: Any,
                                                    source: FeatureSource) -> None:
    settings = GenerationSettings(max_new_tokens=6, temperature=0)
    steer = [FeatureIntervention(source, 11, "additive", 8.0, positions=Positions("generated"))]
    default, steered = generate(embedded_model, embedded_tokenizer, PROMPT, [], settings)[0], \
        generate(embedded_model, embedded_tokenizer, PROMPT, steer, settings)[0]
    assert steered.token_ids[0] == default.token_ids[0]  # predicted from the prompt alone
    assert steered.logprobs[0].logprob == default.logprobs[0].logprob


def test_left_padded_batches_equal_one_prompt_at_a_time(embedded_model: Any, embedded_tokenizer: Any,
                                                        source: FeatureSource) -> None:
    prompts = ["Hello", PROMPT, "A list comprehension is a concise way to build"]
    steer = [FeatureIntervention(source, 11, "additive", 2.0)]
    settings = GenerationSettings(max_new_tokens=10, temperature=0.7, seed=3)
    batch = side_by_side(embedded_model, embedded_tokenizer, prompts, steer, settings)
    for prompt, together in zip(prompts, batch, strict=True):
        (alone,) = side_by_side(embedded_model, embedded_tokenizer, prompt, steer, settings)
        assert together.default.token_ids == alone.default.token_ids
        assert together.steered.token_ids == alone.steered.token_ids
        for a, b in zip(together.steered.logprobs, alone.steered.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
    assert any(r.default.token_ids != r.steered.token_ids for r in batch)
    top = batch[1].default.logprobs[0]
    assert len(top.top) == settings.n_logprobs and top.top[0][2] >= top.logprob


def test_decode_stops_at_eos(embedded_model: Any) -> None:
    eos = 2
    ids, _ = decode(embedded_model, [[1, 9690, 198]], GenerationSettings(max_new_tokens=5, temperature=0),
                    pad_id=eos, eos_ids=set(range(50000)))
    assert len(ids[0]) == 1  # every token ends the text


def test_the_hooks_are_removed_even_on_error(embedded_model: Any, ids: torch.Tensor,
                                             source: FeatureSource) -> None:
    clean = logits_of(embedded_model, ids, [])
    steer = [FeatureIntervention(source, 4, "additive", 5.0)]
    with pytest.raises(RuntimeError, match="boom"), intervene(embedded_model, steer):
        raise RuntimeError("boom")
    assert torch.equal(logits_of(embedded_model, ids, []), clean)
    assert not embedded_model._forward_pre_hooks


def test_bad_inputs_are_one_line_errors(embedded_model: Any, embedded_tokenizer: Any, source: FeatureSource,
                                        tmp_path: Path) -> None:
    def one_line(error: pytest.ExceptionInfo[Any]) -> str:
        text = str(error.value)
        assert "\n" not in text
        return text

    with pytest.raises(FeatureNotFoundError) as err:
        parse_feature("256=+2", source)
    assert "256 features" in one_line(err) and "0 to 255" in one_line(err)
    with pytest.raises(InterventionError) as err:
        parse_feature("3=wobble:2", source)
    assert "additive" in one_line(err) and "projection_cap" in one_line(err)
    with pytest.raises(InterventionError) as err:
        parse_feature("3", source)
    with pytest.raises(InterventionError) as err:
        parse_feature("x=+2", source)
    with pytest.raises(InterventionError, match="no value"):
        parse_feature("3=zero:1", source)
    with pytest.raises(InterventionError, match="resample"):
        parse_feature("3=resample", source)
    with pytest.raises(InterventionError, match="clamp:0"):
        parse_feature("3=clamp", source)
    with pytest.raises(InterventionError, match="raw vector"):
        VectorIntervention(TINY_HOOK, torch.ones(576), "clamp")
    with pytest.raises(PositionError):
        Positions.parse("middle")
    wrong_hook = [VectorIntervention("blocks.99.hook_resid_post", torch.ones(576))]
    with pytest.raises(SaeworksError, match="valid names"), intervene(embedded_model, wrong_hook):
        pass
    wrong_width = [VectorIntervention(TINY_HOOK, torch.ones(64))]
    with pytest.raises(InterventionError, match="576 wide"), intervene(embedded_model, wrong_width):
        pass
    with pytest.raises(SaeworksError, match="not a readable safetensors"):
        parse_vector(f"{tmp_path / 'missing.safetensors'}@{TINY_HOOK}=+1")
    no_units = FeatureSource(source.sae, source.hook, source.first_kept, "bare")
    with pytest.raises(InterventionError, match="raw=True"):
        FeatureIntervention(no_units, 3, "additive", 1.0)
    with pytest.raises(InterventionError, match="mean"):
        FeatureIntervention(no_units, 3, "mean")
    with pytest.raises(GenerationError) as err:
        GenerationSettings(max_new_tokens=0, top_p=2.0)
    assert "max_new_tokens=0" in one_line(err) and "top_p=2.0" in one_line(err)
    limit = embedded_model.config.max_position_embeddings
    with pytest.raises(GenerationError) as err:
        generate(embedded_model, embedded_tokenizer, "word " * (limit + 10), [], GenerationSettings())
    assert f"at most {limit}" in one_line(err) and "never truncated" in one_line(err)


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_every_model_family_generates_and_steers_like_a_full_forward(case_id: str) -> None:
    """On a tiny random model of each supported family: our decoding loop is `model.generate`'s,
    token for token, and a steered cached generation equals the same intervention over the
    finished sequence (the position tracker reads every family's cache and mask)."""
    model = _model(case_id)
    rows = [[3, 17, 25, 9, 40], [5, 6]]
    settings = GenerationSettings(max_new_tokens=6, temperature=0, n_logprobs=0, stop_at_eos=False)
    ids, _ = decode(model, rows[:1], settings, pad_id=0, eos_ids=set())
    expected = model.generate(torch.tensor(rows[:1]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                              do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert ids[0] == expected[0, 5:].tolist()
    width = int(model.config.hidden_size)
    vector = torch.randn(width, generator=torch.Generator().manual_seed(1))
    steer = [VectorIntervention("blocks.1.hook_resid_post", vector, "additive", 2.0,
                                positions=Positions("generated")),
             VectorIntervention("blocks.0.hook_mlp_out", torch.ones(width), "orthogonal", 0.0)]
    with intervene(model, steer):
        generated, logprobs = decode(model, rows, settings, pad_id=0, eos_ids=set())
    for row, new, recorded in zip(rows, generated, logprobs, strict=True):
        with torch.no_grad(), intervene(model, steer, prompt_length=len(row)):
            full = model(torch.tensor([row + new])).logits[0].float().log_softmax(-1)
        expected_lp = full[len(row) - 1:-1].gather(1, torch.tensor(new)[:, None])[:, 0]
        torch.testing.assert_close(torch.stack([lp for lp, _, _ in recorded]), expected_lp, atol=1e-4, rtol=0)
