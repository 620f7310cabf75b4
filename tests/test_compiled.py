"""`harvest.compile` (activations/compiled.py): blocks run compiled where no hook reaches inside them,
give the eager forward's activations within float32 rounding, and fall back to eager on failure."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from saeworks.activations import compiled
from saeworks.activations.compiled import CompiledForward, compile_blocks, hooked_inside
from saeworks.activations.config import ModelConfig
from saeworks.activations.hooks import blocks_of, capture_activations, hooks_attached
from saeworks.activations.model import load_model
from saeworks.activations.store import ActivationStore
from saeworks.cli import main
from tests.helpers import DEMO_CONFIG, small_harvest_overrides

HOOKS = ["blocks.2.hook_resid_post", "blocks.3.mlp.hook_post"]


@pytest.fixture(scope="module")
def compiled_model():  # type: ignore[no-untyped-def]
    """(the embedded model with compiled blocks, their CompiledForwards): its own instance, the
    shared fixture stays eager."""
    model = load_model(ModelConfig(name="embedded", dtype="float32", device="cpu"))
    return model, compile_blocks(model)


INPUT_IDS = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_activations(  # type: ignore[no-untyped-def]
        compiled_model, embedded_model) -> None:
    """Blocks 0-2 run compiled (block 2's hook is its own post-hook, outside its forward); block 3
    holds the MLP hook, so it runs eagerly; the forward stops there. Activations as eager's."""
    model, forwards = compiled_model
    assert len(forwards) == model.config.num_hidden_layers
    assert [block.forward for block in blocks_of(model)] == forwards
    assert compile_blocks(model) == forwards  # compiling again keeps the same ones
    assert not any(isinstance(block.forward, CompiledForward) for block in blocks_of(embedded_model))
    before = [dict(f.calls) for f in forwards[:5]]
    got = capture_activations(model, INPUT_IDS, HOOKS)
    want = capture_activations(embedded_model, INPUT_IDS, HOOKS)
    for name in HOOKS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
    ran = [{k: f.calls[k] - b[k] for k in b} for f, b in zip(forwards[:5], before, strict=True)]
    compiled_once, eager_once = {"compiled": 1, "eager": 0}, {"compiled": 0, "eager": 1}
    assert ran == [compiled_once] * 3 + [eager_once, {"compiled": 0, "eager": 0}]


@pytest.mark.slow
def test_a_hook_writing_a_blocks_output_intervenes_through_the_compiled_block(  # type: ignore[no-untyped-def]
        compiled_model, embedded_model) -> None:
    """A splice-like hook on block 1's own output (its post-hook, run after the compiled forward)
    changes everything after it as in the eager model."""

    def halve(activation: torch.Tensor) -> torch.Tensor:
        return activation * 0.5

    logits = []
    for model in (compiled_model[0], embedded_model):
        with torch.no_grad(), hooks_attached(model, {"blocks.1.hook_resid_post": halve}):
            logits.append(model(input_ids=INPUT_IDS).logits)
    with torch.no_grad():
        clean = embedded_model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-3)
    assert (logits[1] - clean).abs().max() > 1.0  # the hook did change the output
    assert all(f.calls["compiled"] >= 1 for f in compiled_model[1])


def test_a_block_with_a_hook_inside_is_seen_and_its_own_hooks_are_not() -> None:
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert not hooked_inside(block)
    handle = block.register_forward_hook(lambda module, args, out: None)
    assert not hooked_inside(block)  # the block's own hook runs outside its forward
    handle.remove()
    handle = block[0].register_forward_pre_hook(lambda module, args: None)
    assert hooked_inside(block)
    handle.remove()
    assert not hooked_inside(block)


def test_a_failing_compile_warns_once_and_runs_every_block_eagerly(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    attempts = []

    def no_compiler(fn):  # type: ignore[no-untyped-def]
        def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
            attempts.append(fn)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(compiled.torch, "compile", no_compiler)
    state = compiled.CompileState()
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)]
    for block in blocks:
        block.forward = CompiledForward(block, state)  # type: ignore[method-assign]
    x = torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, logger="saeworks.activations.compiled"):
        outputs = [blocks[1](blocks[0](x)) for _ in range(2)]
    want = torch.tanh(torch.tanh(x @ blocks[0][0].weight.T + blocks[0][0].bias) @ blocks[1][0].weight.T
                      + blocks[1][0].bias)
    for out in outputs:
        torch.testing.assert_close(out, want)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "compiling Sequential failed, the blocks run eagerly" in warnings[0]
    assert "no working C++ compiler" in warnings[0] and "more detail" not in warnings[0]
    assert len(attempts) == 1  # the second block never tried
    assert [b.forward.calls for b in blocks] == [{"compiled": 0, "eager": 2}] * 2


@pytest.mark.slow
def test_a_compiled_harvest_stores_the_eager_rows(tmp_path: Path) -> None:
    """`harvest.compile=true` from the command line: the store's rows are the eager harvest's, to
    float16 rounding of float32 differences."""
    eager, fast = tmp_path / "eager", tmp_path / "compiled"
    assert main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(eager)]) == 0
    compiled_run = small_harvest_overrides(fast, **{"harvest.compile": "true"})
    assert main(["harvest", str(DEMO_CONFIG), *compiled_run]) == 0
    a = ActivationStore.open(str(eager / "activations.zarr"))
    b = ActivationStore.open(str(fast / "activations.zarr"))
    assert a.n_tokens == b.n_tokens == 16 * 64
    for hook in HOOKS:
        rows_a, rows_b = (store.read_rows(hook, 0, store.n_tokens).float() for store in (a, b))
        torch.testing.assert_close(rows_b, rows_a, rtol=2e-3, atol=1e-3)
