"""Orthogonalisation (`saeworks.interp.orthogonalize`): the weight edit against its hook-based
definition, on the embedded model and on tiny random models of every supported family.

(a) the edited model's logits equal the original's with d̂ projected out, by hooks, of the
    embeddings and of every attention and MLP output (the outputs of the modules the edit changes);
(b) no layer's residual stream has a d̂ component left;
(c) the saved directory reloads with AutoModelForCausalLM.from_pretrained and generates what the
    in-memory edited model generates.
The session-shared embedded model and the cached tiny models are deep-copied, never edited.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, PreTrainedModel

from saeworks.activations.hooks import capture_activations, hooks_attached
from saeworks.interp.orthogonalize import (
    CONFIG_KEY,
    Direction,
    OrthogonalizeError,
    load_direction,
    norm_scale,
    orthogonalize,
    residual_components,
    save_orthogonalized,
)
from tests.test_hooks import CASES, N_LAYERS, _ids, _model

TOLERANCE: dict[str, Any] = {"rtol": 1e-4, "atol": 1e-4}
POST_NORMED = ("gemma2", "gemma3_text")
TEXT = "def add(a, b): return a + b. The capital of France is"


def _projector(unit: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def project(h: torch.Tensor) -> torch.Tensor:
        return h - (h @ unit)[..., None] * unit

    return project


def _output_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return fn(output)

    return hook


@contextmanager
def _projected_outputs(modules: list[nn.Module], units: list[torch.Tensor]) -> Iterator[None]:
    """Project units[i] out of modules[i]'s output, with plain torch hooks."""
    handles = [m.register_forward_hook(_output_hook(_projector(u)))
               for m, u in zip(modules, units, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _embedding_modules(model: PreTrainedModel) -> list[nn.Module]:
    found = [model.get_input_embeddings()]
    return [*found, model.get_submodule("transformer.wpe")] if model.config.model_type == "gpt2" else found


@torch.no_grad()
def _reference_logits(model: PreTrainedModel, ids: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """The original model with d̂ projected out of the residual stream after the embeddings and
    after every attention and MLP output (the hook map's hook_attn_out / hook_mlp_out)."""
    n_layers = int(model.config.num_hidden_layers)
    fns = {f"blocks.{layer}.{kind}": _projector(unit)
           for layer in range(n_layers) for kind in ("hook_attn_out", "hook_mlp_out")}
    embeddings = _embedding_modules(model)
    with _projected_outputs(embeddings, [unit] * len(embeddings)), hooks_attached(model, fns):
        return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def _post_normed_reference(model: PreTrainedModel, ids: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Gemma 2/3: each o_proj / down_proj output loses (1 + w) ⊙ d̂ (w its post-norm's weight),
    the embeddings lose d̂."""
    modules, units = [model.get_input_embeddings()], [unit]
    for block in model.model.layers:
        for proj, norm in ((block.self_attn.o_proj, block.post_attention_layernorm),
                           (block.mlp.down_proj, block.post_feedforward_layernorm)):
            weighted = (1 + norm.weight) * unit
            modules.append(proj)
            units.append(weighted / weighted.norm())
    with _projected_outputs(modules, units):
        return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def _relative_components(model: PreTrainedModel, ids: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """[layers + 1] the largest |h · d̂| / ‖h‖ of the embeddings (resid_pre 0) and every resid_post."""
    n_layers = int(model.config.num_hidden_layers)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    captured = capture_activations(model, ids, names)
    return torch.stack([((captured[n] @ unit).abs() / captured[n].norm(dim=-1)).max() for n in names])


# ---- tiny random models of every family ----------------------------------------------------------


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_tiny_models_equal_their_hooked_original(case_id: str, one_thread: None) -> None:
    original = _model(case_id)
    edited = copy.deepcopy(original)
    direction = torch.randn(original.config.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    unit = direction / direction.norm()
    record = orthogonalize(edited, direction)
    ids = _ids()

    with torch.no_grad():
        logits = edited(input_ids=ids, use_cache=False).logits
        before = original(input_ids=ids, use_cache=False).logits
    post_normed = original.config.model_type in POST_NORMED
    reference = (_post_normed_reference if post_normed else _reference_logits)(original, ids, unit)
    torch.testing.assert_close(logits, reference, **TOLERANCE)
    assert (logits - before).abs().max() > 1e-3  # the edit did something

    assert (_relative_components(edited, ids, unit) < 1e-5).all()  # (b)
    assert max(residual_components(edited, ids, direction)) < 1e-5
    assert (_relative_components(original, ids, unit) > 1e-3).any()
    assert record.post_norm_weighted == post_normed
    assert record.norm == pytest.approx(float(direction.norm()))
    n_writers = 1 + 2 * N_LAYERS + (original.config.model_type == "gpt2")
    assert len({name.rsplit(".", 1)[0] for name in record.edited}) == n_writers
    assert getattr(edited.config, CONFIG_KEY)[-1]["source"] == "tensor"


def test_tied_embeddings_are_untied_with_the_original_readout(one_thread: None) -> None:
    original: Any = _model("gpt2")
    edited: Any = copy.deepcopy(original)
    record = orthogonalize(edited, torch.ones(original.config.hidden_size))
    assert record.untied_lm_head and not edited.config.tie_word_embeddings
    assert edited.lm_head.weight is not edited.transformer.wte.weight
    torch.testing.assert_close(edited.lm_head.weight, original.transformer.wte.weight, rtol=0, atol=0)
    assert original.lm_head.weight is original.transformer.wte.weight  # the cached model is untouched


# ---- the embedded model --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edited:
    model: PreTrainedModel
    direction: torch.Tensor
    ids: torch.Tensor


@pytest.fixture(scope="module")
def edited_embedded(embedded_model: PreTrainedModel, embedded_tokenizer: Any) -> _Edited:
    """A fresh copy of the embedded model (reloaded: the shared fixture stays as it is), edited."""
    from saeworks.activations.config import ModelConfig
    from saeworks.activations.model import load_model

    edited = load_model(ModelConfig(device="cpu", dtype="float32"))
    direction = torch.randn(edited.config.hidden_size, generator=torch.Generator().manual_seed(0))
    orthogonalize(edited, Direction(direction, "a random test direction", "blocks.10.hook_resid_post"))
    return _Edited(edited, direction, torch.tensor([embedded_tokenizer(TEXT)["input_ids"]]))


def _recorder(into: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    def record(h: torch.Tensor) -> None:
        into[name] = h

    return record


@torch.no_grad()
def test_embedded_model_equals_its_hooked_original(embedded_model: PreTrainedModel,
                                                   edited_embedded: _Edited) -> None:
    ids, unit = edited_embedded.ids, edited_embedded.direction / edited_embedded.direction.norm()
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(embedded_model.config.num_hidden_layers)]
    residual: dict[str, torch.Tensor] = {}
    with hooks_attached(edited_embedded.model, {n: _recorder(residual, n) for n in names}):
        logits = edited_embedded.model(input_ids=ids, use_cache=False).logits
    reference = _reference_logits(embedded_model, ids, unit)
    # (a) 1e-4 of the logits' scale: float32 rounding through 30 layers moves single logits by
    # ~5e-5 (the hooked reference itself is that far from a float64 run), so an element-wise 1e-4
    # is noise-bound; a wrong edit is off by O(1).
    assert float((logits - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    # (b) no layer's residual stream keeps a d̂ component
    worst = max(float(((h @ unit).abs() / h.norm(dim=-1)).max()) for h in residual.values())
    assert worst < 1e-5
    assert embedded_model.lm_head.weight is embedded_model.model.embed_tokens.weight  # untouched
    untied = edited_embedded.model.lm_head.weight
    assert untied is not edited_embedded.model.model.embed_tokens.weight
    assert torch.equal(untied, embedded_model.lm_head.weight)  # the readout is the original one


@torch.no_grad()
def test_saved_directory_reloads_and_generates(edited_embedded: _Edited, embedded_tokenizer: Any,
                                               tmp_path: Path) -> None:
    out = save_orthogonalized(edited_embedded.model, embedded_tokenizer, tmp_path / "edited")  # (c)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    (record,) = config[CONFIG_KEY]
    assert record["source"] == "a random test direction" and record["hook"] == "blocks.10.hook_resid_post"
    assert record["norm"] == pytest.approx(float(edited_embedded.direction.norm()), rel=1e-6)
    assert record["saeworks_version"] and record["untied_lm_head"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt").input_ids
    generated = reloaded.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # The in-memory edited model's greedy choice at every step, teacher-forced in one forward.
    logits = edited_embedded.model(input_ids=generated, use_cache=False).logits
    greedy = logits[0, prompt.shape[1] - 1:-1].argmax(dim=-1)
    assert generated[0, prompt.shape[1]:].tolist() == greedy.tolist()
    assert torch.equal(reloaded.model.embed_tokens.weight, edited_embedded.model.model.embed_tokens.weight)
    assert torch.equal(reloaded.lm_head.weight, edited_embedded.model.lm_head.weight)


# ---- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("vector", "message"), [
    (torch.ones(63), "residual stream is 64 wide"),
    (torch.ones(2, 64), "residual stream is 64 wide"),
    (torch.zeros(64), "zero vector"),
    (torch.full((64,), float("nan")), "NaN"),
])
def test_bad_directions_are_refused_before_any_edit(vector: torch.Tensor, message: str) -> None:
    edited: Any = copy.deepcopy(_model("gpt2"))
    with pytest.raises(OrthogonalizeError, match=message) as err:
        orthogonalize(edited, vector)
    assert "\n" not in str(err.value)
    assert edited.lm_head.weight is edited.transformer.wte.weight and edited.config.tie_word_embeddings


def test_unsupported_family_and_unedited_save(tmp_path: Path) -> None:
    bert = AutoModelForCausalLM.from_config(BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        is_decoder=True))
    with pytest.raises(OrthogonalizeError, match=r"model type 'bert'.*supported: llama"):
        orthogonalize(bert, torch.ones(16))
    with pytest.raises(OrthogonalizeError, match="not orthogonalised"):
        save_orthogonalized(_model("gpt2"), object(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_direction_files(tmp_path: Path) -> None:
    one, two = tmp_path / "probe.safetensors", tmp_path / "two.safetensors"
    save_file({"direction": torch.arange(4.0)}, str(one), {"hook": "blocks.3.hook_resid_post"})
    save_file({"a": torch.ones(4), "b": torch.ones(1, 4)}, str(two))
    found = load_direction(one)
    assert found.vector.tolist() == [0, 1, 2, 3] and found.source == f"{one}:direction"
    assert found.hook == "blocks.3.hook_resid_post"
    assert load_direction(f"{two}:b").vector.shape == (4,)
    assert load_direction(two, "a").source == f"{two}:a"
    bad: list[tuple[str | Path, str]] = [(two, "holds 2 tensors"), (f"{two}:c", "no tensor 'c'"),
                                         (tmp_path / "missing.safetensors", "no vector file")]
    for spec, message in bad:
        with pytest.raises(OrthogonalizeError, match=message):
            load_direction(spec)
    save_file({"m": torch.ones(2, 4)}, str(one))
    with pytest.raises(OrthogonalizeError, match=r"shape \(2, 4\)"):
        load_direction(one)


def test_post_norm_scale_is_read_off_the_norm() -> None:
    gemma2: Any = _model("gemma2")
    norm = gemma2.model.layers[0].post_attention_layernorm
    scale = norm_scale(norm, 64)
    torch.testing.assert_close(scale / scale.norm(), (1 + norm.weight) / (1 + norm.weight).norm())
    with pytest.raises(OrthogonalizeError, match="not a per-coordinate scale"):
        norm_scale(nn.LayerNorm(64), 64)
