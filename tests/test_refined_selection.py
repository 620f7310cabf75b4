"""The refined selection (sae/refined_selection.py): a bfloat16 encoder product picks candidates,
float32 decides, a bound certifies; every answer is the float32 top k, whichever path ran."""

from __future__ import annotations

import pytest
import torch

from saeworks.sae import native, native_sparse, refined_selection
from saeworks.sae.base import TrainContext
from saeworks.sae.config import SAEConfig
from saeworks.sae.sparse import release_workspace, workspace
from saeworks.sae.topk import TopKSAE
from saeworks.train.native_step import native_sae_step, native_step_applies

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler: no refined selection")


def _float32_top_k(x_centred: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [rows, k] of the dense pre-activations, each row by ascending latent: summed
    in float64, the top k that float32 rounding could disturb only at near-ties (none in these data)."""
    values, indices = (x_centred.double() @ W_enc.double() + b_enc.double()).topk(k, dim=1)
    indices, order = indices.sort(dim=1)
    return values.gather(1, order).float(), indices


def _sae(d_in: int, d_sae: int, k: int, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in) * 0.2)
    return sae


def _inputs(rows: int, d_in: int, seed: int = 1) -> torch.Tensor:
    """Activations with a decaying spectrum and a spread of norms, as a residual stream has."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.linspace(1.0, 0.05, d_in)
    scale = torch.rand(rows, 1, generator=generator) * 20 + 1
    return torch.randn(rows, d_in, generator=generator) * spectrum * scale


@pytest.mark.parametrize(("d_in", "d_sae"), [(37, 1040), (64, 1040), (48, 1024)])
def test_encoder_copies_are_the_transpose_the_rounding_and_their_norms(d_in: int, d_sae: int) -> None:
    """Any shape: d_in a multiple of 16 takes the line-by-line (streaming) stores of the transpose;
    a width that is not a multiple of 16 a last narrower block."""
    torch.manual_seed(0)
    W = torch.randn(d_in, d_sae) * torch.linspace(0.1, 3.0, d_sae)
    copies = native_sparse.encoder_copies(W)
    assert copies is not None
    assert torch.equal(copies.transposed, W.T) and copies.transposed.is_contiguous()
    assert torch.equal(copies.rounded, W.to(torch.bfloat16))
    assert copies.largest_norm == pytest.approx(float(W.norm(dim=0).max()), rel=1e-5)
    rounding = (W - copies.rounded.float()).norm(dim=0).max()
    assert copies.largest_rounding == pytest.approx(float(rounding), rel=1e-5) and copies.largest_rounding > 0


@pytest.mark.parametrize(("rows", "d_in", "d_sae", "k"), [(512, 64, 2048, 8), (300, 200, 4096, 32),
                                                          (7, 33, 1024, 1)])
def test_the_kernel_certifies_only_the_float32_top_k(rows: int, d_in: int, d_sae: int, k: int) -> None:
    sae = _sae(d_in, d_sae, k)
    x = sae.centred(_inputs(rows, d_in)).detach().contiguous()
    copies = native_sparse.encoder_copies(sae.W_enc.detach())
    assert copies is not None
    x_rounded = x.to(torch.bfloat16)
    products = x_rounded @ copies.rounded
    selection = native_sparse.refined_top_k(products, sae.b_enc.detach(), x, x_rounded, copies, k)
    assert selection is not None
    want_values, want_indices = _float32_top_k(x, sae.W_enc.detach(), sae.b_enc.detach(), k)
    certified = torch.ones(rows, dtype=torch.bool)
    certified[selection.uncertified] = False
    assert certified.float().mean() > 0.95  # the bound is not vacuous
    assert torch.equal(selection.indices[certified], want_indices[certified])
    torch.testing.assert_close(selection.values[certified], want_values[certified], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("crowd", [9, 300])
def test_a_latent_the_bfloat16_product_hides_is_found(crowd: int) -> None:
    """bfloat16 rounds x0 = 1.0035 to 1.0: latent T (x0 alone) ranks below `crowd` latents of about
    1.001 in bfloat16 and above them in float32. The candidates (every latent whose bfloat16 value
    is within twice the error bound of the k-th) include T, and its float32 value wins; where more
    than 256 latents crowd that close the kernel refuses the rows and the dense path finds T."""
    k, d_sae, d_in = 4, 512, 16
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, apply_b_dec_to_input=False))
    T, crowded, high = 0, torch.arange(1, crowd + 1), list(range(500, 500 + k - 1))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.W_enc[0, T], sae.b_enc[T] = 1.0, 0.0
        sae.W_enc[1, crowded], sae.b_enc[crowded] = 1.0, 0.001 + torch.arange(crowd) * 1e-6
        sae.W_enc[2, high], sae.b_enc[high] = 1.0, 0.0
    x = torch.zeros(3, d_in)
    x[:, 0], x[:, 1], x[:, 2] = 1.0035, 1.0, 4.0
    assert float(x[0, 0].to(torch.bfloat16)) == 1.0
    copies = native_sparse.encoder_copies(sae.W_enc.detach())
    assert copies is not None
    rounded = x.to(torch.bfloat16)
    kernel = native_sparse.refined_top_k(rounded @ copies.rounded, sae.b_enc.detach(), x, rounded, copies, k)
    assert kernel is not None
    if crowd > 256:
        assert torch.equal(kernel.uncertified, torch.arange(3))
    else:
        assert len(kernel.uncertified) == 0 and torch.equal(kernel.indices, torch.tensor([[T, *high]] * 3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAEWORKS_REFINED_SELECTION", "on")
        values, indices = sae.encode_active(x)
    assert torch.equal(indices, torch.tensor([[T, *high]] * 3))
    torch.testing.assert_close(values[:, 0], torch.full((3,), 1.0035))


@pytest.mark.parametrize("setting", ["on", "auto"])
def test_encode_active_is_the_float32_top_k_with_every_path(monkeypatch: pytest.MonkeyPatch,
                                                             setting: str) -> None:
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", setting)
    monkeypatch.setattr(refined_selection, "SMALLEST_MEASURED", 0)  # measure this test's small product
    refined_selection.forget_measurements()
    sae = _sae(96, 4096, 16)
    x = _inputs(1000, 96)
    values, indices = sae.encode_active(x)
    want_values, want_indices = _float32_top_k(sae.centred(x).detach(), sae.W_enc.detach(),
                                               sae.b_enc.detach(), 16)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values.relu(), rtol=1e-5, atol=1e-5)
    if setting == "auto":  # measured once for this shape (rows to a power of two), then kept
        key = (1024, 96, 4096, 16, torch.get_num_threads())
        assert list(refined_selection._faster) == [key]
        assert refined_selection.chosen_for(1000, 96, 4096, 16) == refined_selection._faster[key]
        sae.encode_active(x[:600])
        assert list(refined_selection._faster) == [key]
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "off")
    off_values, off_indices = sae.encode_active(x)
    assert torch.equal(off_indices, indices)
    torch.testing.assert_close(off_values, values, rtol=1e-5, atol=1e-5)


def test_auto_leaves_a_small_product_to_the_dense_path_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "auto")
    refined_selection.forget_measurements()
    sae = _sae(96, 4096, 16)
    x = _inputs(1000, 96)  # 2^28.6 multiply-adds
    selection = refined_selection.refined_top_k(sae.W_enc, sae.b_enc, sae.centred(x), 16,
                                                dense=lambda: (x, x))
    assert selection is None
    assert not refined_selection._faster and not refined_selection.chosen_for(1000, 96, 4096, 16)


def test_where_it_cannot_run_it_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "on")
    W = torch.randn(32, 4096)
    x = torch.randn(10, 32)
    assert refined_selection.applies(W, x, 8)
    assert refined_selection.applies(W, x, 64)
    assert not refined_selection.applies(W, x, 65)  # the k-th of the block maxima: a width of 64 k
    assert not refined_selection.applies(W.double(), x.double(), 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert not refined_selection.applies(W, x, 8)
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "off")
    assert not refined_selection.applies(W, x, 8)


@pytest.mark.parametrize("dead_fraction", [0.0, 0.3])
def test_a_training_step_has_the_same_loss_and_gradients(monkeypatch: pytest.MonkeyPatch,
                                                          dead_fraction: float) -> None:
    """With dead latents the AuxK loss computes their pre-activations itself (no dense ones exist)."""
    sae = _sae(64, 2048, 8)
    x = _inputs(384, 64)
    dead = torch.rand(2048, generator=torch.Generator().manual_seed(5)) < dead_fraction
    results = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", setting)
        sae.zero_grad(set_to_none=True)
        out = sae.training_forward(x, TrainContext(0.0, dead))
        out.loss.backward()
        results[setting] = (out, {name: p.grad.clone() for name, p in sae.named_parameters()})
    (on, on_grads), (off, off_grads) = results["on"], results["off"]
    torch.testing.assert_close(on.loss, off.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(on.aux, off.aux, rtol=1e-5, atol=0)
    assert (float(on.aux.detach()) > 0) == (dead_fraction > 0)
    assert torch.equal(on.fired, off.fired)
    for name, grad in on_grads.items():
        torch.testing.assert_close(grad, off_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_copies_follow_every_update_of_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept copies of W_enc are used only while W_enc is unchanged: after an in-place torch update
    and after the native Adam step (which writes through a pointer), the selection is the new one."""
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "on")
    sae = _sae(64, 2048, 8)
    x = _inputs(256, 64)

    def check() -> None:
        _, indices = sae.encode_active(x)
        _, want = _float32_top_k(sae.centred(x).detach(), sae.W_enc.detach(), sae.b_enc.detach(), 8)
        assert torch.equal(indices, want)

    check()
    first = refined_selection.encoder_copies(sae.W_enc)
    assert refined_selection.encoder_copies(sae.W_enc) is first  # kept while nothing changed
    with torch.no_grad():
        sae.W_enc[:, :1024].mul_(-1.0)
    check()
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.05)
    group = optimizer.param_groups[0]
    sae.training_forward(x, TrainContext(0.0, None)).loss.backward()
    assert native_step_applies(sae, group, optimizer)
    before = refined_selection.encoder_copies(sae.W_enc)
    native_sae_step(sae, group, optimizer, clip_norm=None)
    assert refined_selection.encoder_copies(sae.W_enc) is not before
    check()


def test_saes_of_one_shape_share_the_copies_memory_and_keep_their_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's SAEs take turns with one thread's copies: each encode is still its own SAE's."""
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "on")
    saes = [_sae(64, 2048, 8, seed=seed) for seed in (0, 1)]
    x = _inputs(256, 64)
    memory = set()
    for sae in saes * 2:
        _, indices = sae.encode_active(x)
        _, want = _float32_top_k(sae.centred(x).detach(), sae.W_enc.detach(), sae.b_enc.detach(), 8)
        assert torch.equal(indices, want)
        memory.add(refined_selection.encoder_copies(sae.W_enc).transposed.data_ptr())
    assert len(memory) == 1
    release_workspace()
    assert getattr(workspace(), "encoder_copies", None) is None


def test_rows_with_nan_or_inf_answer_as_the_dense_path(monkeypatch: pytest.MonkeyPatch) -> None:
    refined_selection.forget_measurements()  # the product check sees the NaN rows first
    sae = _sae(64, 2048, 8)
    x = _inputs(64, 64)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    answers = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", setting)
        answers[setting] = sae.encode_active(x)
    (values, indices), (want_values, want_indices) = answers["on"], answers["off"]
    finite = torch.ones(64, dtype=torch.bool)
    finite[[3, 7]] = False
    assert torch.equal(indices[finite], want_indices[finite])
    torch.testing.assert_close(values[finite], want_values[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[~finite], want_values[~finite], equal_nan=True)
    assert torch.equal(indices[~finite], want_indices[~finite])


def test_an_encoder_made_in_inference_mode_is_copied_at_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference tensors have no version counter, and change in place inside inference_mode without
    one: their copies are never reused."""
    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", "on")
    x = _inputs(256, 64)
    with torch.inference_mode():
        sae = _sae(64, 2048, 8)
        _, first = sae.encode_active(x)
        sae.W_enc[:, :1024].mul_(-1.0)
        _, second = sae.encode_active(x)
        _, want = _float32_top_k(sae.centred(x), sae.W_enc, sae.b_enc, 8)
    assert torch.equal(second, want) and not torch.equal(first, second)


@pytest.mark.parametrize("setting", ["on", "auto"])
def test_a_bfloat16_product_summed_in_bfloat16_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                          setting: str) -> None:
    """The bound assumes float32 sums; a BLAS that rounds partial sums to bfloat16 (here every 64
    terms) is caught by the check against a float64 product: a warning, and the dense answers."""
    def summed_in_bfloat16(x_rounded: torch.Tensor, W_rounded: torch.Tensor, out: torch.Tensor) -> None:
        total = torch.zeros(out.shape, dtype=torch.bfloat16)
        for start in range(0, x_rounded.shape[1], 64):
            part = x_rounded[:, start:start + 64].float() @ W_rounded[start:start + 64].float()
            total = (total.float() + part).to(torch.bfloat16)
        out.copy_(total)

    monkeypatch.setenv("SAEWORKS_REFINED_SELECTION", setting)
    monkeypatch.setattr(refined_selection, "SMALLEST_MEASURED", 0)
    monkeypatch.setattr(refined_selection, "bfloat16_product", summed_in_bfloat16)
    refined_selection.forget_measurements()
    sae = _sae(256, 2048, 8)
    x = _inputs(64, 256)
    calls = []
    monkeypatch.setattr(refined_selection, "bfloat16_product",
                        lambda *args: calls.append(1) or summed_in_bfloat16(*args))
    with pytest.warns(RuntimeWarning, match="does not accumulate in float32"):
        values, indices = sae.encode_active(x)
    assert list(refined_selection._product_checked.values()) == [False]
    sae.encode_active(x)
    assert len(calls) == 1  # refused once, then not computed again
    assert not refined_selection.chosen_for(64, 256, 2048, 8) or setting == "on"
    want_values, want_indices = _float32_top_k(sae.centred(x).detach(), sae.W_enc.detach(),
                                               sae.b_enc.detach(), 8)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values.relu(), rtol=1e-5, atol=1e-5)
    refined_selection.forget_measurements()
