"""Hook points (`activations/hooks.py`) against tiny random models of every supported family.

Each family gets a 3-layer, 64-wide causal LM built from its transformers config class (no
download). The tests check the TransformerLens meaning of every hook name numerically: where the
residual stream is read, that attention and MLP outputs are exactly what each block adds, that
`mlp.hook_post` is the down projection's input, that capture stops early, that writes take
effect, that bad names are explained, and that hooks never outlive their context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from saeworks.activations.hooks import (
    ARCHITECTURES,
    HOOK_KINDS,
    HookError,
    capture_activations,
    hooks_attached,
    resolve_hook,
)

N_LAYERS = 3
LAST = N_LAYERS - 1
D_MODEL = 64
D_MLP = 96
VOCAB = 128
BATCH, SEQ = 2, 7

# The same arithmetic, at most summed in another order (parallel residual): float32 rounding only.
TIGHT: dict[str, float] = {"rtol": 1e-5, "atol": 1e-5}

_LLAMA_DIMS: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": D_MODEL,
    "intermediate_size": D_MLP,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
}
# Gemma 2/3 keep sliding windows and soft-capping; a window shorter than SEQ on alternate layers
# makes the sliding layers really differ from the global one.
_GEMMA2_DIMS: dict[str, Any] = {
    **_LLAMA_DIMS,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
}


@dataclass(frozen=True)
class Case:
    """One tiny model; module paths are written out here, independently of the hook map."""

    id: str
    family: str
    make_config: Callable[[], PretrainedConfig]
    blocks: str
    final_norm: str
    down_proj: str = "mlp.down_proj"
    post_mlp_norm: str | None = None
    """Block norm applied to the MLP's output before it joins the residual stream (Gemma 2/3)."""


def _gpt_neox(parallel: bool) -> Case:
    return Case(
        f"gpt_neox-{'parallel' if parallel else 'sequential'}",
        "gpt_neox",
        functools.partial(
            GPTNeoXConfig,
            vocab_size=VOCAB,
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            use_parallel_residual=parallel,
        ),
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        down_proj="mlp.dense_4h_to_h",
    )


CASES: tuple[Case, ...] = (
    Case("llama", "llama", lambda: LlamaConfig(**_LLAMA_DIMS), "model.layers", "model.norm"),
    Case(
        "mistral",
        "mistral",
        lambda: MistralConfig(**_LLAMA_DIMS, sliding_window=None),
        "model.layers",
        "model.norm",
    ),
    Case("qwen2", "qwen2", lambda: Qwen2Config(**_LLAMA_DIMS), "model.layers", "model.norm"),
    Case("qwen3", "qwen3", lambda: Qwen3Config(**_LLAMA_DIMS), "model.layers", "model.norm"),
    Case("gemma", "gemma", lambda: GemmaConfig(**_LLAMA_DIMS), "model.layers", "model.norm"),
    Case(
        "gemma2",
        "gemma2",
        lambda: Gemma2Config(**_GEMMA2_DIMS),
        "model.layers",
        "model.norm",
        post_mlp_norm="post_feedforward_layernorm",
    ),
    Case(
        "gemma3_text",
        "gemma3_text",
        lambda: Gemma3TextConfig(**_GEMMA2_DIMS),
        "model.layers",
        "model.norm",
        post_mlp_norm="post_feedforward_layernorm",
    ),
    Case(
        "gpt2",
        "gpt2",
        lambda: GPT2Config(
            vocab_size=VOCAB,
            n_embd=D_MODEL,
            n_inner=D_MLP,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=64,
        ),
        "transformer.h",
        "transformer.ln_f",
        down_proj="mlp.c_proj",
    ),
    _gpt_neox(parallel=True),
    _gpt_neox(parallel=False),
)
_BY_ID = {case.id: case for case in CASES}


@functools.cache
def _model(case_id: str) -> PreTrainedModel:
    """The tiny random float32 model of a case, in eval mode (built once per session)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _BY_ID[case_id].make_config(), dtype=torch.float32, attn_implementation="eager"
    )
    # Random init leaves norm scales at 1 (Gemma: 0, for 1 + w) and biases at 0; perturb every
    # vector parameter so a misplaced norm or bias cannot hide behind an identity.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(params=[case.id for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return _BY_ID[request.param]


@pytest.fixture
def model(case: Case) -> PreTrainedModel:
    model = _model(case.id)
    assert model.config.model_type == case.family
    return model


def _ids(seed: int = 1) -> torch.Tensor:
    """Random token ids `[BATCH, SEQ]`."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _names(kinds: tuple[str, ...], layers: range = range(N_LAYERS)) -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in layers for kind in kinds]


def _blocks(model: nn.Module, case: Case) -> nn.ModuleList:
    blocks = model.get_submodule(case.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == N_LAYERS
    return blocks


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Number of forward hooks and forward pre-hooks on every submodule."""
    return {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
    }


def _zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@torch.no_grad()
def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@contextmanager
def _counting_calls(modules: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Count forward calls of each module with plain torch hooks (removed on exit)."""
    counts = dict.fromkeys(modules, 0)

    def counter(key: str) -> Callable[..., None]:
        def count(*_: Any) -> None:
            counts[key] += 1

        return count

    handles = [module.register_forward_hook(counter(key)) for key, module in modules.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _recording_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record each module's output (in `modules` order) with plain torch hooks."""
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(modules)

    def recorder(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            outputs[index] = output.detach()

        return record

    handles = [module.register_forward_hook(recorder(i)) for i, module in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def test_every_supported_family_is_tested() -> None:
    """A family added to the hook map without a tiny-model case here fails this test."""
    assert {case.family for case in CASES} == set(ARCHITECTURES)


def test_resid_hooks_match_hf_hidden_states(case: Case, model: PreTrainedModel) -> None:
    """resid_pre/resid_post read the residual stream where HF's `hidden_states` do."""
    ids = _ids()
    captured = capture_activations(model, ids, _names(("hook_resid_pre", "hook_resid_post")))
    with torch.no_grad():
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    for layer in range(N_LAYERS):
        pre = captured[f"blocks.{layer}.hook_resid_pre"]
        post = captured[f"blocks.{layer}.hook_resid_post"]
        assert pre.shape == post.shape == (BATCH, SEQ, D_MODEL)
        torch.testing.assert_close(pre, hidden[layer], rtol=0, atol=0)
        if layer < LAST:
            torch.testing.assert_close(post, hidden[layer + 1], rtol=0, atol=0)
    # HF's last hidden state has the final norm applied, so check the last resid_post through it.
    final_norm = model.get_submodule(case.final_norm)
    with torch.no_grad():
        normed = final_norm(captured[f"blocks.{LAST}.hook_resid_post"])
    torch.testing.assert_close(normed, hidden[-1], **TIGHT)


def test_attn_and_mlp_out_are_exactly_what_the_block_adds(model: PreTrainedModel) -> None:
    """resid_pre + attn_out + mlp_out == resid_post, sequential and parallel blocks alike."""
    kinds = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    captured = capture_activations(model, _ids(), _names(kinds))
    for layer in range(N_LAYERS):
        pre, attn, mlp, post = (captured[f"blocks.{layer}.{kind}"] for kind in kinds)
        assert attn.shape == mlp.shape == (BATCH, SEQ, D_MODEL)
        assert attn.abs().amax() > 0 and mlp.abs().amax() > 0
        torch.testing.assert_close(pre + attn + mlp, post, **TIGHT)


def test_mlp_hook_post_is_the_down_projection_input(case: Case, model: PreTrainedModel) -> None:
    """mlp.hook_post is the MLP's hidden activation, and projects down to the MLP's output."""
    ids = _ids()
    captured = capture_activations(model, ids, _names(("mlp.hook_post", "hook_mlp_out")))
    blocks = _blocks(model, case)
    # The MLP modules' own outputs, from an independent forward with plain torch hooks.
    with _recording_outputs([block.get_submodule("mlp") for block in blocks]) as mlp_outputs:
        _logits(model, ids)
    for layer, block in enumerate(blocks):
        name = f"blocks.{layer}.mlp.hook_post"
        hidden = captured[name]
        assert hidden.shape == (BATCH, SEQ, D_MLP)
        assert resolve_hook(model, name).d == D_MLP
        with torch.no_grad():
            down = block.get_submodule(case.down_proj)(hidden)
            torch.testing.assert_close(down, mlp_outputs[layer], **TIGHT)
            added = mlp_outputs[layer]
            if case.post_mlp_norm is not None:
                added = block.get_submodule(case.post_mlp_norm)(added)
        torch.testing.assert_close(added, captured[f"blocks.{layer}.hook_mlp_out"], **TIGHT)


def test_resolve_hook_widths_and_base_model(case: Case, model: PreTrainedModel) -> None:
    """Resolution reports the activation width and also works on the bare base model."""
    blocks = _blocks(model, case)
    for kind in HOOK_KINDS:
        point = resolve_hook(model, f"blocks.1.{kind}")
        assert (point.layer, point.kind) == (1, kind)
        assert point.d == (D_MLP if kind == "mlp.hook_post" else D_MODEL)
    assert resolve_hook(model.base_model, "blocks.1.hook_resid_post").module is blocks[1]
    assert resolve_hook(model, "blocks.1.hook_resid_pre").module is blocks[1]


def test_capture_stops_after_last_requested_hook(case: Case, model: PreTrainedModel) -> None:
    """Capturing an early hook never runs later blocks, the final norm or the LM head."""
    blocks = _blocks(model, case)
    watched = {
        "block0": blocks[0],
        "block1": blocks[1],
        "block1.mlp": blocks[1].get_submodule("mlp"),
        "block2": blocks[2],
        "final_norm": model.get_submodule(case.final_norm),
        "lm_head": model.get_output_embeddings(),
    }
    with _counting_calls(watched) as counts:
        before = _hook_counts(model)
        capture_activations(model, _ids(), ["blocks.0.hook_resid_post"])
        assert _hook_counts(model) == before
        assert counts == {**dict.fromkeys(watched, 0), "block0": 1}

        captured = capture_activations(model, _ids(), ["blocks.1.hook_attn_out"])
        assert _hook_counts(model) == before
        assert counts["block1.mlp"] == counts["block2"] == counts["lm_head"] == 0
        assert set(captured) == {"blocks.1.hook_attn_out"}


def test_hooks_are_removed_after_exceptions(case: Case, model: PreTrainedModel) -> None:
    """Hooks are gone after a hook fn raises mid-forward, or the with-body raises."""
    ids = _ids()
    clean = _logits(model, ids)
    before = _hook_counts(model)

    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    fns = {
        "blocks.0.hook_resid_pre": _zeros,
        "blocks.0.mlp.hook_post": _zeros,
        "blocks.1.hook_attn_out": boom,
        "blocks.2.hook_resid_post": _zeros,
    }
    with pytest.raises(RuntimeError, match="boom"), hooks_attached(model, fns):
        assert _hook_counts(model) != before
        model(input_ids=ids, use_cache=False)
    assert _hook_counts(model) == before

    with pytest.raises(KeyError), hooks_attached(model, {"blocks.0.hook_resid_post": _zeros}):
        raise KeyError("body")
    assert _hook_counts(model) == before
    torch.testing.assert_close(_logits(model, ids), clean, rtol=0, atol=0)


def test_zeroing_resid_post_changes_logits(model: PreTrainedModel) -> None:
    """A replacing hook fn takes effect, and only inside the context."""
    ids = _ids()
    clean = _logits(model, ids)
    with hooks_attached(model, {"blocks.1.hook_resid_post": _zeros}):
        ablated = _logits(model, ids)
    assert not torch.allclose(ablated, clean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(_logits(model, ids), clean, rtol=0, atol=0)


def test_zeroing_last_resid_post_gives_head_of_zero(case: Case, model: PreTrainedModel) -> None:
    """Zeroing the last resid_post leaves lm_head(final_norm(0)) at every position."""
    with hooks_attached(model, {f"blocks.{LAST}.hook_resid_post": _zeros}):
        logits = _logits(model, _ids())
    with torch.no_grad():
        zero = torch.zeros(1, 1, D_MODEL)
        expected = model.get_output_embeddings()(model.get_submodule(case.final_norm)(zero))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        expected = torch.tanh(expected / cap) * cap
    torch.testing.assert_close(logits, expected.expand(BATCH, SEQ, VOCAB), **TIGHT)


@pytest.mark.parametrize(
    "name", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
)
def test_patching_residual_stream_transplants_the_run(model: PreTrainedModel, name: str) -> None:
    """Writing another input's residual stream (input or output hook) reproduces that run."""
    source_ids, target_ids = _ids(seed=1), _ids(seed=2)
    source = capture_activations(model, source_ids, [name])[name]
    expected = _logits(model, source_ids)
    assert not torch.allclose(_logits(model, target_ids), expected)
    with hooks_attached(model, {name: lambda x: source}):
        patched = _logits(model, target_ids)
    torch.testing.assert_close(patched, expected, **TIGHT)


def test_zeroing_attn_and_mlp_out_makes_block_identity(model: PreTrainedModel) -> None:
    """Writing attn_out and mlp_out removes exactly the block's contribution."""
    ids = _ids()
    names = _names(("hook_resid_pre", "hook_resid_post"), range(1, 2))
    with hooks_attached(model, {"blocks.1.hook_attn_out": _zeros, "blocks.1.hook_mlp_out": _zeros}):
        captured = capture_activations(model, ids, names)
    torch.testing.assert_close(captured[names[1]], captured[names[0]], rtol=0, atol=0)
    clean = capture_activations(model, ids, names)
    assert not torch.allclose(clean[names[1]], clean[names[0]])


def test_zeroing_mlp_hook_post_leaves_projected_bias(case: Case, model: PreTrainedModel) -> None:
    """Writing mlp.hook_post (an input hook) feeds the replacement to the down projection."""
    block = _blocks(model, case)[1]
    with hooks_attached(model, {"blocks.1.mlp.hook_post": _zeros}):
        mlp_out = capture_activations(model, _ids(), ["blocks.1.hook_mlp_out"])
    with torch.no_grad():
        expected = block.get_submodule(case.down_proj)(torch.zeros(1, 1, D_MLP))
        if case.post_mlp_norm is not None:
            expected = block.get_submodule(case.post_mlp_norm)(expected)
    torch.testing.assert_close(
        mlp_out["blocks.1.hook_mlp_out"], expected.expand(BATCH, SEQ, D_MODEL), **TIGHT
    )


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "blocks.0.hook_resid",
        "blocks.0.hook_mlp_post",
        "blocks.x.hook_resid_post",
        "hook_resid_post",
        "blocks.99.hook_resid_post",
        f"blocks.{N_LAYERS}.hook_resid_pre",
    ],
)
def test_bad_hook_name_lists_valid_names(name: str) -> None:
    """Unknown or out-of-range names raise HookError listing the valid names and layers."""
    model = _model("llama")
    before = _hook_counts(model)
    one_good_one_bad = {"blocks.0.hook_resid_post": _zeros, name: _zeros}
    for attempt in (
        lambda: resolve_hook(model, name),
        lambda: capture_activations(model, _ids(), [name]),
        lambda: hooks_attached(model, one_good_one_bad).__enter__(),
    ):
        with pytest.raises(HookError) as info:
            attempt()
        message = str(info.value)
        assert name in message
        assert "hook_resid_post" in message and "mlp.hook_post" in message
        assert f"0..{LAST}" in message
        assert _hook_counts(model) == before
    assert issubclass(HookError, ValueError)


class _NoConfig(nn.Module):
    """A module without a config at all."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def _bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return AutoModel.from_config(config)


@pytest.mark.parametrize("make", [_bert, _NoConfig], ids=["bert", "no-config"])
def test_unsupported_model_names_supported_families(make: Callable[[], nn.Module]) -> None:
    """A model outside the map raises HookError naming every supported family."""
    model = make()
    for attempt in (
        lambda: resolve_hook(model, "blocks.0.hook_resid_post"),
        lambda: capture_activations(model, _ids(), ["blocks.0.hook_resid_post"]),
    ):
        with pytest.raises(HookError, match="supported") as info:
            attempt()
        for family in ARCHITECTURES:
            assert family in str(info.value)
