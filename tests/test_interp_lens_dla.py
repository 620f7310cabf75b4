"""The readout, the logit lens and direct logit attribution (`saeworks.interp`, issue 11 items 1, 4).

Identities: the standard readout of the last residual stream is the model's own logits (every family
of tests/test_hooks.py and the embedded model); the frozen norm is linear, so the readouts of the
components of the final residual stream add up to the norm's output; and DLA's terms add up to the
clean run's logit (difference) to 1e-4 in float32, for a random SAE at every DLA hook kind on every
tiny family and for the trained SAE of the tiny dictionary on the embedded model.
"""

from __future__ import annotations

import json

import pytest
import torch

from saeworks.eval.dictionary import FeatureDictionary
from saeworks.interp.dla import direct_logit_attribution
from saeworks.interp.lens import lens_logits, logit_lens
from saeworks.interp.readout import InterpError, Readout, clean_run
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.config import SAEConfig
from saeworks.sae.errors import SaeworksError
from saeworks.sae.registry import create_sae
from tests.test_hooks import CASES, D_MODEL, N_LAYERS, VOCAB, _model

FAMILIES = [case.id for case in CASES]
IDS = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(3))  # [pos]
DLA_HOOKS = ("blocks.1.hook_resid_post", f"blocks.{N_LAYERS - 1}.hook_resid_post", "blocks.1.hook_resid_pre",
             "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out")
PROMPT = "The capital of France is"
PNG = b"\x89PNG"

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_sae(d_in: int = D_MODEL) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", k=8, d_sae=128).resolved(d_in))
    with torch.no_grad():
        sae.b_dec.normal_(0.0, 0.3)  # a non-zero b_dec, so its term is really tested
    return sae.eval()


@pytest.fixture(scope="module")
def tiny_dict(tiny_dictionary):  # type: ignore[no-untyped-def]
    with FeatureDictionary.open(tiny_dictionary, readonly=True) as dictionary:
        yield dictionary


@pytest.mark.parametrize("family", FAMILIES)
def test_readout_and_lens_match_the_model(family: str) -> None:
    """Last layer through the standard readout == the model's logits; the frozen norm is linear."""
    model = _model(family)
    expected = model(input_ids=IDS[None]).logits[0]  # [pos, vocab]
    layers = list(lens_logits(model, IDS))
    assert [name for name, _ in layers] == ["embed", *map(str, range(N_LAYERS))]
    torch.testing.assert_close(layers[-1][1], expected, rtol=1e-5, atol=1e-5)

    readout = Readout.of(model)
    assert readout.softcap == (30.0 if family == "gemma2" else None)
    hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS)]
    run = clean_run(model, IDS, hooks)
    torch.testing.assert_close(run.final_resid, run.activations[hooks[-1]])
    frozen = readout.freeze(run.final_resid, run.normed)
    stream = torch.stack([run.activations[hook] for hook in hooks])  # [layers + 1, pos, d]
    writes = torch.cat([stream[:1], stream.diff(dim=0)])  # embeddings, then what each block adds
    normed = frozen(writes).sum(dim=0) + (0.0 if frozen.bias is None else frozen.bias)
    torch.testing.assert_close(normed, run.normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(readout.apply_softcap(readout.unembed_linear(normed)), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_adds_up_on_every_family(family: str) -> None:
    model, sae = _model(family), _random_sae()
    for hook in DLA_HOOKS:
        for contrast in (None, 9):
            result = direct_logit_attribution(sae, IDS, 5, model=model, hook=hook, position=3,
                                              contrast=contrast)
            assert result.total == pytest.approx(result.model_logit, abs=1e-4), (hook, contrast)
            assert sum(f.contribution for f in result.features) == pytest.approx(
                result.terms["features"], abs=1e-5)
            assert len(result.features) == 8 and result.terms["b_dec"] != 0.0
            if hook == f"blocks.{N_LAYERS - 1}.hook_resid_post":
                assert result.terms["rest"] == 0.0
    assert ("norm_bias" in result.terms) == family.startswith(("gpt2", "gpt_neox"))


def test_lens_on_the_embedded_model(embedded_model, embedded_tokenizer) -> None:  # type: ignore[no-untyped-def]
    lens = logit_lens(embedded_model, PROMPT, tokenizer=embedded_tokenizer, target=" Paris", top_k=3)
    ids = torch.tensor([lens.token_ids])
    with torch.no_grad():
        probs = embedded_model(input_ids=ids).logits[0].float().softmax(dim=-1)  # [pos, vocab]
    values, indices = probs.topk(3, dim=-1)
    assert torch.equal(lens.top_ids[-1], indices)
    torch.testing.assert_close(lens.top_probs[-1], values, rtol=1e-5, atol=1e-5)
    assert lens.target_prob is not None and lens.target_rank is not None
    torch.testing.assert_close(lens.target_prob[-1], probs[:, lens.target], rtol=1e-5, atol=1e-6)
    assert int(lens.target_rank[-1, -1]) == 1 and lens.first_top_layer() is not None
    assert len(lens.layers) == 31 and lens.tokens[0] == "<|im_start|>"
    assert "Paris" in lens.table() and lens.table().count("\n") == len(lens.layers) + 1
    json.dumps(lens.to_json())
    assert lens.png().startswith(PNG)


def test_dla_with_a_real_sae_adds_up(tiny_dict, embedded_model, embedded_tokenizer) -> None:  # type: ignore[no-untyped-def]
    for contrast in (None, " London"):
        result = direct_logit_attribution(tiny_dict, PROMPT, " Paris", contrast=contrast,
                                          model=embedded_model, tokenizer=embedded_tokenizer, top=5)
        assert result.total == pytest.approx(result.model_logit, abs=1e-4)
        assert result.hook == "blocks.3.hook_resid_post" and result.position == len(result.tokens) - 1
        assert set(result.terms) == {"features", "error", "b_dec", "rest"}
        assert result.features and all(f.label for f in result.features)
        magnitudes = [abs(f.contribution) for f in result.features]
        assert magnitudes == sorted(magnitudes, reverse=True)
    assert result.predicted_text == " Paris"
    table = result.table()
    assert "London" in table and f"#{result.features[0].feature}" not in table  # ids in a column
    assert str(result.features[0].feature) in table and "rest (what later blocks write)" in table
    json.dumps(result.to_json())
    assert result.png().startswith(PNG)


def test_bad_inputs_are_one_line_errors(tiny_dict, embedded_model, embedded_tokenizer) -> None:  # type: ignore[no-untyped-def]
    def refused(match: str, **kwargs: object) -> None:
        args = {"prompt": PROMPT, "target": " Paris", "model": embedded_model,
                "tokenizer": embedded_tokenizer, **kwargs}
        with pytest.raises(InterpError, match=match) as info:
            direct_logit_attribution(args.pop("source", tiny_dict), **args)  # type: ignore[arg-type]
        assert isinstance(info.value, SaeworksError) and "\n" not in str(info.value)

    refused(r"position 7 is out of range: the prompt is 6 tokens .* -6..-1", position=7)
    refused(r"'defaultdict' is 2 tokens \['default', 'dict'\]; .* e\.g\. ' defaultdict' with its "
            "leading space", target="defaultdict")
    refused(r"' Marseille' is 3 tokens .* e\.g\. its first token ' Mar'", target=" Marseille")
    refused(r"contrast ' Paris' is the target", contrast=" Paris")
    refused(r"target token id 1000000000 is out of range: .* ids 0\.\.49151", target=10**9)
    refused(r"DLA cannot decompose blocks\.3\.mlp\.hook_post", source=_random_sae(1536),
            hook="blocks.3.mlp.hook_post")
    refused("a bare SAE needs its hook", source=_random_sae(576))
    with pytest.raises(InterpError, match="position -9"):
        logit_lens(embedded_model, PROMPT, tokenizer=embedded_tokenizer).table(position=-9)
