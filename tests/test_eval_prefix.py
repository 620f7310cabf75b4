"""The shared prefix of evaluation (activations/suffix.py): logits of the layers after a hook,
run from the captured prefix, equal the full forward's with the same edit, for every variant,
every hook kind and every supported family; evaluate's figures with and without it are the same.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
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

import saeworks.eval.evaluate as evaluate_module
from saeworks.activations.hooks import HOOK_KINDS, HookFn, blocks_of, capture_activations, hooks_attached
from saeworks.activations.suffix import SuffixError, plan_suffix, suffix_head_input, suffix_logits
from saeworks.eval.head import OutputHead
from saeworks.eval.metrics import DownstreamAccumulator, kl_per_prediction
from saeworks.sae.interventions import ablate_mean, ablate_zero, replace_from
from saeworks.sae.io import load_sae
from tests.eval_helpers import TINY_HOOK, evaluate_run

FIRST_KEPT = 2
_DIMS: dict[str, Any] = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "head_dim": 16, "max_position_embeddings": 64}
# Sliding windows shorter than the sequence on alternate layers: per-layer masks must be right.
_SLIDING: dict[str, Any] = {**_DIMS, "sliding_window": 4,
                            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
FAMILIES: dict[str, Any] = {
    "llama": lambda: LlamaConfig(**_DIMS),
    "mistral": lambda: MistralConfig(**_DIMS, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_DIMS),
    "qwen3": lambda: Qwen3Config(**_DIMS),
    "gemma": lambda: GemmaConfig(**_DIMS),
    "gemma2": lambda: Gemma2Config(**_SLIDING),
    "gemma3_text": lambda: Gemma3TextConfig(**_SLIDING),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=64, n_inner=96, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=64),
}


@functools.cache
def tiny_model(family: str) -> PreTrainedModel:
    """A 3-layer random float32 model of `family` (vector parameters perturbed, so no norm or bias
    is an identity that could hide a misplaced input)."""
    torch.manual_seed(0)
    config: PretrainedConfig = FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def edits(width: int) -> dict[str, HookFn | None]:
    """The four evaluation variants: clean, a spliced-like linear map, zero- and mean-ablated."""
    generator = torch.Generator().manual_seed(3)
    mix = torch.randn(width, width, generator=generator) / width**0.5
    mean = torch.randn(width, generator=generator)
    return {"clean": None, "spliced": replace_from(FIRST_KEPT, lambda kept: kept @ mix),
            "zero": ablate_zero(FIRST_KEPT), "mean": ablate_mean(mean, FIRST_KEPT)}


@torch.no_grad()
def assert_suffix_equals_full(model: PreTrainedModel, hook: str, ids: torch.Tensor) -> None:
    plan = plan_suffix(model, hook)
    captured = capture_activations(model, ids, plan.capture_names)
    for variant, fn in edits(captured[hook].shape[-1]).items():
        with hooks_attached(model, {hook: fn} if fn else {}):
            full = model(input_ids=ids, use_cache=False).logits
        suffix = suffix_logits(model, ids, plan, captured[plan.entry_hook], fn)
        assert torch.equal(suffix, full), f"{hook} {variant}: {float((suffix - full).abs().max())}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_suffix_logits_equal_full_forward_for_every_family_and_hook(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    for layer in range(3):
        for kind in HOOK_KINDS:
            assert_suffix_equals_full(model, f"blocks.{layer}.{kind}", ids)
    # the prefix blocks are whole again afterwards: no pass-through left behind
    with torch.no_grad():
        again = model(input_ids=ids, use_cache=False).logits
        reference = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32,
                                                     attn_implementation="eager")
        reference.load_state_dict(model.state_dict())
        assert torch.equal(again, reference.eval()(input_ids=ids, use_cache=False).logits)
    assert not any("forward" in vars(block) for block in blocks_of(model))


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_suffix_logits_equal_full_forward_on_the_embedded_model(embedded_model: Any) -> None:
    """The real model, float32, bit for bit: mid-stack, the last block (suffix = norm and head
    only), the first block's input (suffix = every block), and a hook inside a block."""
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 1  # BOS, as evaluation windows start
    for hook in (TINY_HOOK, "blocks.29.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.5.hook_mlp_out"):
        plan = plan_suffix(embedded_model, hook)
        captured = capture_activations(embedded_model, ids, plan.capture_names)
        for variant, fn in edits(576).items():
            with hooks_attached(embedded_model, {hook: fn} if fn else {}):
                full = embedded_model(input_ids=ids, use_cache=False).logits
            suffix = suffix_logits(embedded_model, ids, plan, captured[plan.entry_hook], fn)
            assert torch.equal(suffix, full), f"{hook} {variant}"


@torch.no_grad()
def test_the_suffix_stopped_at_the_head_gives_its_input(monkeypatch: Any) -> None:
    """suffix_head_input: the head applied to it is the suffix's logits; the head's hook is gone
    afterwards; a model whose forward never calls a head is named, not answered with logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_DIMS), dtype=torch.float32).eval()
    plan = plan_suffix(model, "blocks.1.hook_resid_post")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    entry = capture_activations(model, ids, [plan.entry_hook])[plan.entry_hook]
    head_input = suffix_head_input(model, ids, plan, entry)
    assert head_input.shape == entry.shape
    assert torch.equal(model.get_output_embeddings()(head_input), suffix_logits(model, ids, plan, entry))
    assert not model.get_output_embeddings()._forward_pre_hooks
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    with pytest.raises(SuffixError, match="never called its output head"):
        suffix_head_input(model, ids, plan, entry)


def test_a_forward_that_does_not_call_each_block_once_is_refused() -> None:
    """A forward that runs a block twice (so skipping a prefix would mis-score it) is named, and
    evaluate falls back to full forwards on it (SuffixError)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_DIMS), dtype=torch.float32).eval()
    first, second, _ = model.model.layers
    model.model.layers = nn.ModuleList([first, second, second])
    plan = plan_suffix(model, "blocks.0.hook_resid_post")  # the suffix enters at block 1
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    entry = capture_activations(model, ids, [plan.entry_hook])[plan.entry_hook]
    with pytest.raises(SuffixError, match="ran its entry module 2 times"):
        suffix_logits(model, ids, plan, entry)
    assert "forward" not in vars(first)  # the pass-through is gone again


def test_chunked_scoring_equals_whole_batch_formulas() -> None:
    """CE and KL scored in chunks equal the whole-batch formulas (log-softmax of every logit)."""
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 300, (3, 20), generator=generator)
    logits = {name: (4 * torch.randn(3, 20, 300, generator=generator)).bfloat16()
              for name in ("clean", "spliced", "zero", "mean")}
    down = DownstreamAccumulator(FIRST_KEPT)
    down.update(ids, logits["clean"], ((name, logits[name]) for name in ("spliced", "zero", "mean")))
    targets = ids[:, FIRST_KEPT + 1:]
    log_probs = {name: torch.log_softmax(value[:, FIRST_KEPT:-1].double(), dim=-1)
                 for name, value in logits.items()}
    expected = {f"ce_{name}": float(-lp.gather(-1, targets.unsqueeze(-1)).mean())
                for name, lp in log_probs.items()}
    expected["kl"] = float(kl_per_prediction(log_probs["clean"], log_probs["spliced"]).mean())
    figures = down.result()
    for key, value in expected.items():
        assert figures[key] == pytest.approx(value, rel=1e-6), key
    with_zero = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))  # p = 0 where log p = -inf: adds nothing
    assert float(kl_per_prediction(with_zero, torch.log(torch.tensor([[0.25, 0.5, 0.25]])))) == \
        pytest.approx(0.5 * float(torch.log(torch.tensor(2.0))), rel=1e-6)


def test_evaluate_with_the_shared_prefix_equals_full_forwards(tiny_run: Any, monkeypatch: Any) -> None:
    """evaluate's figures with four full forwards per batch (the fallback) and with one prefix and
    four suffixes are the same; the suffix path runs one prefix capture per batch, not five; once
    one window's logits (the model's own) have matched its head, the suffixes stop at the head's
    input and the head runs chunk by chunk (eval/head.py)."""
    assert load_sae(tiny_run.sae_dir).d_in == 576
    calls = {"capture": 0, "suffix": 0, "head_input": 0, "full": 0}
    for name, key in (("capture_activations", "capture"), ("suffix_logits", "suffix"),
                      ("suffix_head_input", "head_input"), ("_logits", "full")):
        original = getattr(evaluate_module, name)

        def counted(*args: Any, _original: Any = original, _key: str = key, **kwargs: Any) -> Any:
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(evaluate_module, name, counted)
    shared = evaluate_run(tiny_run.sae_dir, tiny_run.cfg)
    n_batches = 8 // tiny_run.cfg.evaluate.batch_size
    assert n_batches >= 2
    assert calls == {"capture": n_batches, "suffix": 1, "head_input": 1 + 4 * n_batches, "full": 0}

    for key in calls:
        calls[key] = 0
    monkeypatch.setattr(OutputHead, "matches", lambda self, head_input, logits: False)
    unchecked = evaluate_run(tiny_run.sae_dir, tiny_run.cfg)  # a head that failed its check: full logits
    assert calls == {"capture": n_batches, "suffix": 1 + 4 * n_batches, "head_input": 1, "full": 0}
    assert unchecked.metrics == pytest.approx(shared.metrics, rel=1e-6)

    def no_suffix(*args: Any, **kwargs: Any) -> Any:
        raise SuffixError("this test's model cannot skip its prefix")

    monkeypatch.setattr(evaluate_module, "suffix_logits", no_suffix)
    full = evaluate_run(tiny_run.sae_dir, tiny_run.cfg)
    assert calls["full"] == 4 * n_batches
    assert full.metrics == pytest.approx(shared.metrics, rel=1e-6)
