"""Input attribution of a feature: integrated gradients are complete on the embedded model with a
real SAE; gradient x input equals a closed form (a feature read off the embeddings themselves) and
finite differences (a deeper feature of a tiny float64 llama); `inputs_embeds` reproduces the
forward on the ids in every family; bad inputs are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from saeworks.activations.hooks import capture_activations
from saeworks.eval.dictionary import FeatureDictionary, FeatureNotFoundError
from saeworks.interp.input_attribution import (
    AttributionError,
    FeatureSite,
    activation_from_embeddings,
    gradient_x_input,
    integrated_gradients,
    prompt_ids,
)
from saeworks.sae.config import SAEConfig
from saeworks.sae.relu import ReLUSAE
from tests.test_hooks import CASES, VOCAB, _model

PROMPT = "The cat sat on the mat"
COMPLETE = "for i in range(10):"
"""A prompt whose strongest feature at the last position converges at 128 steps: not all do on
SmolLM2 with a zero baseline (interp/input_attribution.py says by how much they miss)."""


@pytest.fixture(scope="module")
def site(tiny_dictionary: Path, embedded_model: Any, embedded_tokenizer: Any) -> FeatureSite:
    dictionary = FeatureDictionary.open(tiny_dictionary, readonly=True)
    return FeatureSite.from_dictionary(dictionary, embedded_model, embedded_tokenizer)


def relu_sae(d_in: int, d_sae: int = 6, seed: int = 0) -> ReLUSAE:
    """A random ReLU SAE whose feature 2 fires on everything (large b_enc): locally linear."""
    torch.manual_seed(seed)
    sae = ReLUSAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, k=1))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_dec.normal_()
        sae.b_enc[2] = 1e3
    return sae.eval()


def test_integrated_gradients_are_complete_on_the_embedded_model(site: FeatureSite) -> None:
    ids = prompt_ids(site.tokenizer, COMPLETE)
    h = capture_activations(site.model, torch.tensor([ids]), [site.hook])[site.hook][0, -1]
    with torch.no_grad():
        latents = site.sae.encode(h)
    feature = int(latents.argmax())  # the strongest feature at the last position
    activation = float(latents[feature])
    assert activation > 0
    result = integrated_gradients(site, COMPLETE, feature, -1, steps=128)
    assert result.activation == pytest.approx(activation, rel=1e-5)  # it fires: ungated = activation
    difference = result.activation - result.baseline_activation
    assert abs(result.total - difference) <= 0.01 * abs(difference), result.table()
    assert result.completeness_gap == pytest.approx(result.total - difference)
    assert result.attributions[0] == 0  # BOS keeps its embedding in the baseline
    assert result.position == len(ids) - 1 and result.token_ids == ids
    assert result.to_json()["tokens"][-1]["attribution"] == result.attributions[-1]
    assert "adaptive" in result.table(3) and len(result.top(3)) == 3


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_feature_read_off_the_embeddings_has_its_closed_form(family: str) -> None:
    """At blocks.0.hook_resid_pre h = c·e (c = 1; Gemma: sqrt(d_model), applied inside the model),
    so F = relu((c·e_p − b_dec)·w + b) has ∂F/∂e_p = c·w and nothing else: gradient x input at p
    is c·e_p·w, and integrated gradients from zero along this linear path give the same."""
    model = _model(family)
    d = model.config.hidden_size
    scale = d**0.5 if family == "gemma" else 1.0
    sae, ids, position = relu_sae(d), [5, 17, 99, 3], 2
    site = FeatureSite(model, None, sae, "blocks.0.hook_resid_pre", prepend_bos=False)
    embeddings = model.get_input_embeddings().weight[ids].detach()  # [T, d]
    expected = torch.zeros(len(ids))
    expected[position] = scale * embeddings[position] @ sae.W_enc[:, 2].detach()
    grad_x_input = gradient_x_input(site, ids, 2, position)
    torch.testing.assert_close(torch.tensor(grad_x_input.attributions), expected, rtol=1e-5, atol=1e-4)
    ig = integrated_gradients(site, ids, 2, position, steps=3)
    torch.testing.assert_close(torch.tensor(ig.attributions), expected, rtol=1e-5, atol=1e-4)
    assert ig.completeness_gap == pytest.approx(0, abs=1e-3)
    assert grad_x_input.tokens == ["5", "17", "99", "3"]


def test_gradient_x_input_equals_finite_differences_deeper_in() -> None:
    """Token t's gradient x input is d/ds F(x with row t scaled by s) at s = 1: central differences
    on a float64 tiny llama, a feature at blocks.1.hook_resid_post after attention and MLPs. (HF's
    RMSNorm computes in float32 whatever the model's dtype, so the step is 1e-2, not 1e-6: float32
    rounding over 2e-2 is ~1e-5 relative, the O(step²) truncation error ~1e-4.)"""
    model = copy.deepcopy(_model("llama")).double()
    sae = relu_sae(model.config.hidden_size).double()
    site = FeatureSite(model, None, sae, "blocks.1.hook_resid_post", prepend_bos=False)
    ids, position, eps = [7, 1, 64, 30, 12], 3, 1e-2
    result = gradient_x_input(site, ids, 2, position, quantity="pre_activation")
    x = model.get_input_embeddings()(torch.tensor([ids])).detach()  # [1, T, d]

    def feature(embeds: torch.Tensor) -> float:
        with torch.no_grad():
            h = activation_from_embeddings(model, site.hook, embeds)[0, position]
            return float(sae.pre_activations(h)[2])

    numeric = []
    for t in range(len(ids)):
        up, down = x.clone(), x.clone()
        up[0, t] *= 1 + eps
        down[0, t] *= 1 - eps
        numeric.append((feature(up) - feature(down)) / (2 * eps))
    torch.testing.assert_close(torch.tensor(result.attributions, dtype=torch.float64),
                               torch.tensor(numeric, dtype=torch.float64), rtol=1e-3, atol=1e-6)
    assert result.attributions[4] == 0  # causal: a later token cannot matter
    assert all(abs(a) > 1e-6 for a in result.attributions[:4])


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("llama", "gemma", "gemma3_text", "gpt2")],
                         ids=lambda c: c.id)
def test_inputs_embeds_reproduce_the_forward_on_ids(case: Any) -> None:
    """The 'input' of the attributions is what the embedding module returns: fed back through
    inputs_embeds it gives the forward on the ids (Gemma scales after it, Gemma 3 inside it)."""
    model = _model(case.id)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        from_embeds = activation_from_embeddings(model, hook, model.get_input_embeddings()(ids))
    torch.testing.assert_close(from_embeds, capture_activations(model, ids, [hook])[hook])


def test_the_gated_activation_and_the_other_quantities(site: FeatureSite) -> None:
    ids = prompt_ids(site.tokenizer, PROMPT)
    h = capture_activations(site.model, torch.tensor([ids]), [site.hook])[site.hook][0, 3]
    with torch.no_grad():
        latents, pre = site.sae.encode(h), site.sae.pre_activations(h)
    active = int(latents.argmax())
    for quantity, value in (("activation", latents[active]), ("pre_activation", pre[active])):
        result = gradient_x_input(site, ids, active, 3, quantity=quantity)
        assert result.activation == pytest.approx(float(value), rel=1e-5)
    ungated = gradient_x_input(site, ids, active, 3)
    gated = gradient_x_input(site, ids, active, 3, quantity="activation")
    assert ungated.attributions == pytest.approx(gated.attributions, rel=1e-5, abs=1e-7)


def test_bad_inputs_are_one_line_errors(site: FeatureSite) -> None:
    def message(error: type[Exception], call: Any) -> str:
        with pytest.raises(error) as caught:
            call()
        assert "\n" not in str(caught.value)
        return str(caught.value)

    n = len(prompt_ids(site.tokenizer, PROMPT))
    assert f"has {n} tokens" in message(AttributionError, lambda: gradient_x_input(site, PROMPT, 0, n))
    assert "out of range" in message(AttributionError, lambda: integrated_gradients(site, PROMPT, 0, -n - 1))
    assert "ids 0 to 255" in message(FeatureNotFoundError, lambda: gradient_x_input(site, PROMPT, 256))
    assert "steps" in message(AttributionError, lambda: integrated_gradients(site, PROMPT, 0, steps=0))
    assert "baseline" in message(AttributionError,
                                 lambda: integrated_gradients(site, PROMPT, 0, baseline=torch.zeros(3, 4)))
    assert "quantity" in message(AttributionError, lambda: gradient_x_input(site, PROMPT, 0, quantity="x"))
    assert "empty" in message(AttributionError, lambda: gradient_x_input(site, [], 0))
