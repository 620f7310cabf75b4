"""The native optimiser step (train/native_step.py, sae/kernels/adam_step.c) is the torch step:
decoder-gradient projection, gradient clipping, Adam, dropped gradients, unit-norm decoder rows;
its Adam state is torch.optim.Adam's (the torch step continues it); its result does not depend on
the thread count; it declines what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch

from saeworks.sae import native
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.config import SAEConfig
from saeworks.sae.registry import create_sae
from saeworks.train.native_step import native_sae_step, native_step_applies
from tests.conftest import torch_threads

D_IN, D_SAE = 48, 160  # d_in not a multiple of the kernels' 32 lanes: the tails count too

pytestmark = pytest.mark.skipif(native.compiler() is None,
                                reason="no C compiler on this machine: the trainer takes the torch step")


def make_sae(architecture: str) -> SparseAutoencoder:
    torch.manual_seed(0)
    extra = {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05} \
        if architecture == "jumprelu" else {}
    return create_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=8, **extra))


def set_gradients(sae: SparseAutoencoder, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in sae.parameters():
        grad = (torch.randn(p.shape, generator=g) * 3.0).to(p.dtype)  # norm ~ 100: the clip acts
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


def torch_step(sae: SparseAutoencoder, optimizer: torch.optim.Adam, clip: float | None) -> None:
    """The trainer's torch ops for one SAE's step."""
    sae.project_decoder_grad()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    sae.normalize_decoder()


def adam(sae: SparseAutoencoder, **options: object) -> torch.optim.Adam:
    return torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-7, fused=True, **options)


def assert_same_state(native: torch.optim.Adam, reference: torch.optim.Adam, rtol: float,
                      atol: float) -> None:
    ours, theirs = native.state_dict()["state"], reference.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in ours:
        assert ours[index].keys() == theirs[index].keys()
        assert float(ours[index]["step"]) == float(theirs[index]["step"])
        assert ours[index]["step"].dtype == theirs[index]["step"].dtype
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[index][key], theirs[index][key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("clip", [1.0, None])
def test_native_step_equals_the_torch_step(architecture: str, clip: float | None) -> None:
    native_sae, reference = make_sae(architecture), make_sae(architecture)
    native_adam, reference_adam = adam(native_sae), adam(reference)
    group = native_adam.param_groups[0]
    assert native_step_applies(native_sae, group, native_adam)
    for step in range(5):
        set_gradients(native_sae, step)
        set_gradients(reference, step)
        native_sae_step(native_sae, group, native_adam, clip)
        torch_step(reference, reference_adam, clip)
        for (name, ours), theirs in zip(native_sae.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
            assert ours.grad is None, f"{name}'s gradient is not dropped (the next backward hands its over)"
    assert_same_state(native_adam, reference_adam, rtol=1e-5, atol=1e-6)
    if native_sae.unit_norm_decoder:
        torch.testing.assert_close(native_sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    # the parameters moved: an Adam step of lr 3e-3 per element, not a no-op
    assert (native_sae.W_enc - make_sae(architecture).W_enc).abs().max() > 1e-3


def test_the_decoder_rows_get_their_norm_in_the_adam_pass_or_once_without_a_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a W_dec gradient the Adam pass itself leaves the rows at unit norm (no second pass of
    normalize_decoder after it); without one (nothing reached W_dec) normalize_decoder runs."""
    sae = make_sae("topk")
    optimizer = adam(sae)
    calls: list[int] = []
    monkeypatch.setattr(sae, "normalize_decoder", lambda: calls.append(1))
    set_gradients(sae, 0)
    native_sae_step(sae, optimizer.param_groups[0], optimizer, 1.0)
    assert calls == []
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    set_gradients(sae, 1)
    sae.W_dec.grad = None
    native_sae_step(sae, optimizer.param_groups[0], optimizer, 1.0)
    assert calls == [1]


def test_the_torch_step_continues_the_native_state() -> None:
    """Native steps, then torch steps on the same optimizer = torch steps throughout (a checkpoint
    of either path resumes in the other)."""
    mixed, reference = make_sae("topk"), make_sae("topk")
    mixed_adam, reference_adam = adam(mixed), adam(reference)
    for step in range(6):
        set_gradients(mixed, step)
        set_gradients(reference, step)
        if step < 3:
            native_sae_step(mixed, mixed_adam.param_groups[0], mixed_adam, 1.0)
        else:
            torch_step(mixed, mixed_adam, 1.0)
        torch_step(reference, reference_adam, 1.0)
    for ours, theirs in zip(mixed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    resumed = adam(mixed)
    resumed.load_state_dict(copy.deepcopy(mixed_adam.state_dict()))
    assert_same_state(resumed, reference_adam, rtol=1e-5, atol=1e-6)


def test_the_native_step_is_the_same_on_any_number_of_threads() -> None:
    results = []
    for threads in (1, 2, 3):
        sae = make_sae("topk")
        optimizer = adam(sae)
        with torch_threads(threads):
            for step in range(3):
                set_gradients(sae, step)
                native_sae_step(sae, optimizer.param_groups[0], optimizer, 1.0)
        results.append([p.detach().clone() for p in sae.parameters()])
    for other in results[1:]:
        for ours, theirs in zip(results[0], other, strict=True):
            assert torch.equal(ours, theirs)


def test_the_native_step_declines_what_it_cannot_do(monkeypatch: pytest.MonkeyPatch) -> None:
    sae = make_sae("topk")
    set_gradients(sae, 0)
    assert not native_step_applies(sae, adam(sae, amsgrad=True).param_groups[0], adam(sae, amsgrad=True))
    weight_decay = adam(sae, weight_decay=0.1)
    assert not native_step_applies(sae, weight_decay.param_groups[0], weight_decay)
    monkeypatch.setenv("SAEWORKS_NATIVE", "0")
    plain = adam(sae)
    assert not native_step_applies(sae, plain.param_groups[0], plain)
    with pytest.raises(RuntimeError, match="native_step_applies"):
        native_sae_step(sae, plain.param_groups[0], plain, 1.0)
    monkeypatch.delenv("SAEWORKS_NATIVE")
    assert native_step_applies(sae, plain.param_groups[0], plain)
    sae.W_dec.grad = sae.W_dec.grad.t().contiguous().t()  # a transposed gradient: not the kernel's rows
    assert not native_step_applies(sae, plain.param_groups[0], plain)
    half = make_sae("topk").to(torch.bfloat16)
    set_gradients(half, 0)
    bf16_adam = adam(half)
    assert not native_step_applies(half, bf16_adam.param_groups[0], bf16_adam)
