"""The machine limits the benchmarks divide by (sae/limits.py): each probe does the work it names."""

from __future__ import annotations

import torch

from saeworks.sae.limits import AdamProbe, MatmulProbe


def test_matmul_probe_computes_the_encoder_product() -> None:
    probe = MatmulProbe(8, 5, 7, torch.float32)
    probe.out.zero_()
    assert probe() > 0
    torch.testing.assert_close(probe.out, probe.x @ probe.w)
    assert probe.out.shape == (8, 7)


def test_adam_probe_updates_every_parameter_by_adams_rule() -> None:
    """The update floor holds only if the probe moves every element, by Adam's own rule (its
    constructor took step 1, so a call is step 2)."""
    shapes = [(6, 10), (10, 6), (10,), (6,)]
    probe = AdamProbe(shapes)
    assert probe.elements == 60 + 60 + 10 + 6
    beta1, beta2 = probe.optimizer.param_groups[0]["betas"]
    lr, eps = probe.optimizer.param_groups[0]["lr"], probe.optimizer.param_groups[0]["eps"]
    expected = []
    for p in probe.parameters:
        state = probe.optimizer.state[p]
        g = p.grad.double()
        m = beta1 * state["exp_avg"].double() + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"].double() + (1 - beta2) * g * g
        step = (m / (1 - beta1 ** 2)) / ((v / (1 - beta2 ** 2)).sqrt() + eps)
        expected.append(p.detach().double() - lr * step)
    before = [p.detach().clone() for p in probe.parameters]
    assert probe() > 0
    for old, new, wanted in zip(before, probe.parameters, expected, strict=True):
        assert bool((new != old).all()), "an element was not updated"
        torch.testing.assert_close(new.detach().double(), wanted, rtol=1e-6, atol=1e-9)
