"""Every registered SAE architecture: it learns, its sparsity sits where the architecture puts it,
its sparse training path equals the dense autograd path (values and every gradient), and the
shared math (batch-level top-k, geometric median) is right."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from saeworks.sae.base import SparseAutoencoder, TrainContext, TrainOutput, mse_per_row
from saeworks.sae.batchtopk import BatchTopKSAE, batch_topk
from saeworks.sae.config import SAEConfig
from saeworks.sae.configio import ConfigError
from saeworks.sae.geometric_median import geometric_median
from saeworks.sae.jumprelu import JumpReLUSAE
from saeworks.sae.matryoshka import MatryoshkaBatchTopKSAE
from saeworks.sae.registry import ARCHITECTURES, create_sae
from saeworks.sae.sparse import dense_pre_activations, release_workspace
from saeworks.sae.topk import TopKSAE

D_IN, D_SAE, K = 16, 64, 4

CASES: dict[str, dict[str, Any]] = {
    # per architecture: SAEConfig overrides and the sparsity coefficient used in training
    "relu": {"cfg": {}, "coefficient": 0.05},
    "topk": {"cfg": {}, "coefficient": 0.0},
    "batchtopk": {"cfg": {}, "coefficient": 0.0},
    "jumprelu": {"cfg": {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05}, "coefficient": 0.01},
    "matryoshka_batchtopk": {"cfg": {"matryoshka_prefixes": [8, 24, 64]}, "coefficient": 0.0},
}
ARCHS = sorted(ARCHITECTURES)
SPARSE_KERNELS = [name for name in ARCHS if issubclass(ARCHITECTURES[name], TopKSAE)]


def make_sae(architecture: str, seed: int = 0, **overrides: Any) -> SparseAutoencoder:
    torch.manual_seed(seed)
    settings = {**CASES[architecture]["cfg"], **overrides}
    return create_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K, aux_k=8, **settings))


def sparse_data(n: int, seed: int = 1, n_features: int = 48, active: int = 3) -> torch.Tensor:
    """[n, D_IN] rows that are sums of `active` of `n_features` random unit directions, scaled so
    that the mean squared norm is D_IN (as the trainer scales its inputs)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, D_IN, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    which = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, n_features).scatter_(1, which, torch.rand(n, active, generator=g) + 0.5)
    x = codes @ directions + 0.3 * directions[0]  # a shared offset for b_dec to find
    return x * math.sqrt(D_IN / float(x.pow(2).sum(dim=1).mean()))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest


def train(sae: SparseAutoencoder, x: torch.Tensor, steps: int, coefficient: float,
          lr: float = 1e-2, batch: int = 128) -> list[TrainOutput]:
    """Adam steps as the trainer takes them (projected decoder gradient, renormalised rows)."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(2)
    outputs = []
    for _ in range(steps):
        rows = x[torch.randint(len(x), (batch,), generator=g)]
        out = sae.training_forward(rows, TrainContext(coefficient, None))
        out.loss.backward()
        sae.project_decoder_grad()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder()
        outputs.append(TrainOutput(*(t.detach() for t in out)))
    return outputs


def test_every_registered_architecture_has_a_case() -> None:
    assert set(CASES) == set(ARCHITECTURES), "add a CASES entry for each registered architecture"


@pytest.mark.parametrize("architecture", ARCHS)
def test_training_reduces_the_loss(architecture: str) -> None:
    sae = make_sae(architecture)
    outputs = train(sae, sparse_data(2048), 300, CASES[architecture]["coefficient"])
    for name, factor in (("loss", 0.4), ("mse", 0.25)):  # matryoshka's loss keeps its small prefixes' error
        values = [float(getattr(out, name)) for out in outputs]
        start, end = sum(values[:5]) / 5, sum(values[-20:]) / 20
        assert all(math.isfinite(v) for v in values)
        assert end < factor * start, f"{architecture}: {name} {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("architecture", ARCHS)
def test_train_output_fields(architecture: str) -> None:
    sae = make_sae(architecture)
    x = sparse_data(64)
    dead = torch.arange(D_SAE) % 3 == 0
    out = sae.training_forward(x, TrainContext(0.1, dead))
    assert isinstance(out, TrainOutput)
    assert out.x_hat.shape == x.shape and out.fired.shape == (D_SAE,) and out.fired.dtype == torch.float32
    for name in ("loss", "mse", "sparsity", "aux", "l0"):
        value = getattr(out, name)
        assert value.shape == () and torch.isfinite(value), name
    assert torch.allclose(out.mse, (out.x_hat - x).pow(2).sum(dim=1).mean())
    expected = out.mse + 0.1 * out.sparsity + sae.cfg.aux_coefficient * out.aux
    if architecture != "matryoshka_batchtopk":  # its reconstruction term averages the prefixes
        assert torch.allclose(out.loss, expected)


def training_latents(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """[batch, d_sae] latents as a training step sees them, computed densely."""
    if isinstance(sae, TopKSAE):
        return sae.dense_training_latents(x)
    if isinstance(sae, JumpReLUSAE):
        pre = sae.pre_activations(x)
        return pre * (pre > sae.threshold)
    return sae.encode(x)


@pytest.mark.parametrize("architecture", ARCHS)
def test_fired_and_l0_match_the_latents(architecture: str) -> None:
    sae = make_sae(architecture)
    x = sparse_data(96)
    with torch.no_grad():
        latents = training_latents(sae, x)
        out = sae.training_forward(x, TrainContext(0.1, None))
    active = latents > 0
    assert torch.equal(out.fired, active.sum(dim=0).float())  # on how many rows each latent fired
    assert out.l0.item() == pytest.approx(active.sum(dim=1).float().mean().item())


def test_topk_keeps_exactly_k_per_row() -> None:
    sae = make_sae("topk")
    x = sparse_data(64)
    with torch.no_grad():
        positive = (sae.pre_activations(x) > 0).sum(dim=1)
        counts = (sae.encode(x) > 0).sum(dim=1)
    assert torch.equal(counts, positive.clamp_max(K))
    assert bool((positive >= K).all())  # so every row has exactly k


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_keeps_k_per_row_on_average(architecture: str) -> None:
    sae = make_sae(architecture)
    x = sparse_data(96)
    with torch.no_grad():
        out = sae.training_forward(x, TrainContext(0.0, None))
        counts = (training_latents(sae, x) > 0).sum(dim=1)
    assert int(counts.sum()) == K * len(x) and out.l0.item() == K
    assert int(counts.max()) > K > int(counts.min())  # per-row counts vary


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_threshold_gives_about_k_at_inference(architecture: str) -> None:
    sae = make_sae(architecture)
    train(sae, sparse_data(2048), 300, 0.0)
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0
    with torch.no_grad():
        latents = sae.encode(sparse_data(512, seed=7))
    mean_l0 = float((latents > 0).sum(dim=1).float().mean())
    assert 0.6 * K < mean_l0 < 1.6 * K
    assert torch.equal(latents > 0, sae.pre_activations(sparse_data(512, seed=7)) > sae.threshold)


def test_batchtopk_threshold_tracks_the_smallest_selected_activation() -> None:
    sae = make_sae("batchtopk")
    assert isinstance(sae, BatchTopKSAE)
    x = sparse_data(64)
    with torch.no_grad():
        sae.training_forward(x, TrainContext(0.0, None))
        first = training_latents(sae, x)
    assert float(sae.threshold) == pytest.approx(float(first[first > 0].min()))  # first batch: set
    with torch.no_grad():
        sae.training_forward(2 * x, TrainContext(0.0, None))
    assert float(sae.threshold) == pytest.approx(float(first[first > 0].min()) * 1.01, rel=1e-3)


def test_jumprelu_l0_counts_pre_activations_above_threshold() -> None:
    sae = make_sae("jumprelu")
    assert isinstance(sae, JumpReLUSAE)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-4, 0.5, D_SAE))
        x = sparse_data(64)
        pre = sae.pre_activations(x)
        out = sae.training_forward(x, TrainContext(0.1, None))
        above = pre > sae.threshold
    assert out.l0.item() == pytest.approx(above.sum(dim=1).float().mean().item())
    assert out.sparsity.item() == pytest.approx(out.l0.item())
    assert torch.equal(sae.encode(x) != 0, above)


def test_relu_l0_falls_as_the_l1_coefficient_rises() -> None:
    x = sparse_data(2048)
    l0 = []
    for coefficient in (0.01, 1.0):
        sae = make_sae("relu")
        train(sae, x, 300, coefficient)
        with torch.no_grad():
            l0.append(float((sae.encode(x) > 0).sum(dim=1).float().mean()))
    assert l0[1] < 0.7 * l0[0], l0


def dense_reference(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x_hat, loss) of a TopK-family step through plain dense autograd, AuxK included."""
    latents = training_latents(sae, x)
    x_hat = latents @ sae.W_dec + sae.b_dec
    if isinstance(sae, MatryoshkaBatchTopKSAE):
        recon = torch.stack([(latents[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(dim=1).mean()
                             for m in sae.prefixes]).mean()
    else:
        recon = (x_hat - x).pow(2).sum(dim=1).mean()
    pre = sae.pre_activations(x)
    aux_k = min(sae.cfg.aux_k or D_IN // 2, int(dead.sum()))
    chosen = torch.where(dead, pre.detach(), -torch.inf).topk(aux_k, dim=1).indices
    aux_latents = torch.zeros_like(pre).scatter(1, chosen, pre.gather(1, chosen).relu())
    residual = (x - x_hat).detach()
    aux = (aux_latents @ sae.W_dec - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    return x_hat, recon + sae.cfg.aux_coefficient * aux


def test_mse_per_row_gives_autograds_value_and_gradients() -> None:
    """Its one-product backward equals autograd's chain for both inputs; gradients come back in
    each input's own dtype (a bfloat16 reconstruction against float32 activations)."""
    torch.manual_seed(0)
    x, x_hat = torch.randn(37, 11, dtype=torch.float64), torch.randn(37, 11, dtype=torch.float64)
    mine_x, mine_hat = x.clone().requires_grad_(), x_hat.clone().requires_grad_()
    theirs_x, theirs_hat = x.clone().requires_grad_(), x_hat.clone().requires_grad_()
    mine = mse_per_row(mine_x, mine_hat)
    theirs = (theirs_hat - theirs_x).pow(2).sum(dim=-1).mean()
    torch.testing.assert_close(mine, theirs, rtol=1e-14, atol=0)
    (3.0 * mine).backward()
    (3.0 * theirs).backward()
    for got, want in ((mine_x.grad, theirs_x.grad), (mine_hat.grad, theirs_hat.grad)):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    low = x_hat.bfloat16().requires_grad_()
    mse_per_row(x.float(), low).backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", SPARSE_KERNELS)
def test_sparse_path_equals_dense_autograd(architecture: str, apply_b_dec: bool) -> None:
    sae = make_sae(architecture, apply_b_dec_to_input=apply_b_dec).double()
    with torch.no_grad():  # non-trivial biases so every gradient term is exercised
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
    x = sparse_data(48).double()
    dead = torch.arange(D_SAE) % 4 == 1
    out = sae.training_forward(x, TrainContext(0.0, dead))
    out.loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    x_hat, loss = dense_reference(sae, x, dead)
    loss.backward()
    assert torch.allclose(out.x_hat, x_hat, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.loss, loss, rtol=1e-12, atol=1e-12)
    assert set(sparse_grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, p in sae.named_parameters():
        assert p.grad is not None
        assert torch.allclose(sparse_grads[name], p.grad, rtol=1e-10, atol=1e-12), name


def test_jumprelu_straight_through_gradients() -> None:
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.5).double()
    assert isinstance(sae, JumpReLUSAE)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-3, 0.3, D_SAE, dtype=torch.float64))
    x, coefficient, eps = sparse_data(48).double(), 0.3, 0.5
    out = sae.training_forward(x, TrainContext(coefficient, None))
    out.loss.backward()
    # Reference: d loss / d latents by autograd, then the paper's estimators by hand.
    pre = sae.pre_activations(x).detach()
    theta = sae.threshold.detach()
    latents = (pre * (pre > theta)).requires_grad_(True)
    ((latents @ sae.W_dec.detach() + sae.b_dec.detach() - x).pow(2).sum(dim=1).mean()).backward()
    assert latents.grad is not None
    kernel = (((pre - theta) / eps).abs() < 0.5).double()
    d_theta = (-(theta / eps) * kernel * latents.grad).sum(0) - coefficient * (kernel / eps).sum(0) / len(x)
    assert kernel.sum() > 10  # the window catches pre-activations
    assert torch.allclose(sae.log_threshold.grad, d_theta * theta, rtol=1e-10, atol=1e-12)
    # The encoder side gets the plain gradient H(pre - threshold).
    assert torch.allclose(sae.W_enc.grad, sae.centred(x).T @ (latents.grad * (pre > theta)),
                          rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("architecture", ARCHS)
def test_decoder_rows(architecture: str) -> None:
    sae = make_sae(architecture)
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.equal(sae.W_enc.detach(), sae.W_dec.detach().T)  # tied initialisation
    train(sae, sparse_data(512), 5, CASES[architecture]["coefficient"], lr=1e-2)
    after = sae.W_dec.detach().norm(dim=1)
    if sae.unit_norm_decoder:
        assert torch.allclose(norms, torch.ones(D_SAE)) and torch.allclose(after, torch.ones(D_SAE))
        out = sae.training_forward(sparse_data(32), TrainContext(0.1, None))
        out.loss.backward()
        sae.project_decoder_grad()
        assert sae.W_dec.grad is not None
        radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
        assert radial.abs().max() < 1e-5
    else:  # relu: rows start at 0.1 and are left free
        assert torch.allclose(norms, torch.full((D_SAE,), 0.1))
        assert not torch.allclose(after, norms)


def test_batch_topk_selects_the_batch_top_entries() -> None:
    g = torch.Generator().manual_seed(3)
    for batch, k, boost in [(7, 4, 0.0), (96, 4, 0.0), (32, 60, 0.0), (16, 4, 50.0)]:
        pre = torch.randn(batch, D_SAE, generator=g) * torch.rand(batch, 1, generator=g) * 3
        pre[0] += boost  # one row holding most of the batch's budget forces a wider candidate set
        indices, keep = batch_topk(pre, k)
        mask = torch.zeros(batch, D_SAE, dtype=torch.bool).scatter_(1, indices, keep)
        expected = torch.zeros(batch * D_SAE, dtype=torch.bool)
        expected[pre.flatten().topk(k * batch).indices] = True
        assert torch.equal(mask, expected.view(batch, D_SAE))
        assert indices.shape[1] == int(keep.sum(dim=1).max())


def test_matryoshka_prefixes() -> None:
    sae = make_sae("matryoshka_batchtopk", matryoshka_prefixes=None)
    assert isinstance(sae, MatryoshkaBatchTopKSAE) and sae.prefixes == [4, 16, 64]
    for bad in ([16, 8, 64], [8, 32], [0, 64]):
        with pytest.raises(ConfigError, match="matryoshka_prefixes"):
            make_sae("matryoshka_batchtopk", matryoshka_prefixes=bad)


def test_matryoshka_inner_prefixes_reconstruct_better_than_plain_batchtopk() -> None:
    x = sparse_data(2048)
    inner_mse = {}
    for architecture in ("batchtopk", "matryoshka_batchtopk"):
        sae = make_sae(architecture)
        train(sae, x, 300, 0.0)
        with torch.no_grad():
            latents = training_latents(sae, x)
            inner = latents[:, :8] @ sae.W_dec[:8] + sae.b_dec  # the first prefix alone
            inner_mse[architecture] = float((inner - x).pow(2).sum(1).mean())
    assert inner_mse["matryoshka_batchtopk"] < 0.8 * inner_mse["batchtopk"]


def test_geometric_median() -> None:
    g = torch.Generator().manual_seed(4)
    cluster = torch.randn(200, D_IN, generator=g) + 5.0
    points = torch.cat([cluster, torch.full((20, D_IN), 1e3)])  # 9% far outliers
    median = geometric_median(points)
    assert median.dtype == points.dtype and median.shape == (D_IN,)
    assert (median - 5.0).norm() < 1.5 < (points.mean(0) - 5.0).norm()

    def cost(m: torch.Tensor) -> float:
        return float((points.double() - m.double()).norm(dim=1).sum())

    for _ in range(5):  # a minimum: no nearby point does better
        assert cost(median) <= cost(median + 0.01 * torch.randn(D_IN, generator=g))
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]) + 3
    assert torch.allclose(geometric_median(square), torch.tensor([3.0, 3.0]), atol=1e-5)
    assert torch.equal(geometric_median(points, max_iter=0), points.double().mean(0).float())
    as_float64 = points.double()  # centred in place only when .double() made a copy
    kept = as_float64.clone()
    assert torch.allclose(geometric_median(as_float64).float(), median, atol=1e-5)
    assert torch.equal(as_float64, kept)
    with pytest.raises(ValueError, match="non-empty"):
        geometric_median(torch.zeros(0, D_IN))


def test_pre_activations_under_autocast_are_computed_in_the_autocast_dtype() -> None:
    """Under bfloat16 autocast the reused buffer holds bfloat16: the product of the rounded operands
    plus the rounded bias, exactly; the float32 buffer is handed back when autocast ends."""
    sae = make_sae("topk")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    x_centred = sae.centred(sparse_data(32))
    with torch.autocast("cpu", torch.bfloat16):
        pre = dense_pre_activations(sae, x_centred)
        again = dense_pre_activations(sae, x_centred)
    expected = (x_centred.bfloat16() @ sae.W_enc.detach().bfloat16()) + sae.b_enc.detach().bfloat16()
    assert pre.dtype == torch.bfloat16 and torch.equal(pre, expected)
    assert again.data_ptr() == pre.data_ptr()  # one buffer, reused
    full = dense_pre_activations(sae, x_centred)
    assert full.dtype == torch.float32
    assert torch.allclose(full, x_centred @ sae.W_enc.detach() + sae.b_enc.detach(), atol=1e-6)
    release_workspace()


@pytest.mark.parametrize("architecture", SPARSE_KERNELS)
def test_sparse_step_under_bfloat16_autocast_follows_the_float32_step(architecture: str) -> None:
    """A bfloat16-autocast step (the pre-activations in bfloat16, the sparse backward in float32)
    gives the float32 step's loss and gradients to bfloat16 precision, every gradient present."""
    x = sparse_data(256)
    dead = torch.arange(D_SAE) % 4 == 1

    def step(autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
        sae = make_sae(architecture)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = sae.training_forward(x, TrainContext(0.0, dead))
        out.loss.backward()
        return float(out.loss.detach()), {name: p.grad for name, p in sae.named_parameters()
                                          if p.grad is not None}

    loss, grads = step(False)
    loss_bf16, grads_bf16 = step(True)
    assert set(grads_bf16) == set(grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert loss_bf16 == pytest.approx(loss, rel=3e-2)
    for name, grad in grads.items():
        assert grads_bf16[name].dtype == torch.float32
        assert float((grads_bf16[name] - grad).norm() / grad.norm()) < 5e-2, name


@pytest.mark.parametrize("architecture", ARCHS)
def test_reconstruct_gives_the_forwards_reconstruction(architecture: str) -> None:
    """`reconstruct` (the spliced forward's SAE) = `forward` to float rounding, for rows with a
    leading batch shape; with autograd on it is `forward` itself, gradients included."""
    sae = make_sae(architecture)
    x = sparse_data(60).view(4, 15, D_IN)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)  # a reconstruction that leaves b_dec out differs
        fast, dense = sae.reconstruct(x), sae(x)
    assert fast.shape == x.shape
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, torch.zeros_like(fast))
    graded = sae.reconstruct(x)
    assert graded.requires_grad and torch.equal(graded, sae(x))
