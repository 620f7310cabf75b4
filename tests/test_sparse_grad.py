"""The sparse gradients (sae/kernels/sparse_grad.c): W_enc's through `sparse_transpose_matmul`
(torch's CSR product's numbers, in W_enc's own layout), the decoder's through `sparse_decode`
(embedding_bag's), and the same training step with the native kernels or without."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saeworks.sae import native, native_sparse
from saeworks.sae.base import TrainContext, mse_per_row
from saeworks.sae.config import SAEConfig
from saeworks.sae.sparse import (
    encoder_b_dec_grad,
    selected_pre_activations,
    sparse_decode,
    sparse_transpose_matmul,
    topk_reconstruction,
)
from saeworks.sae.topk import TopKSAE

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler: torch ops only")


def _reference(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor, d_sae: int) -> torch.Tensor:
    """[d_sae, d]: every entry's weight times its row, added into its latent's row."""
    k = indices.shape[1]
    return torch.zeros(d_sae, dense.shape[1], dtype=torch.float64).index_add_(
        0, indices.reshape(-1), weights.reshape(-1, 1).double() * dense.double().repeat_interleave(k, 0))


@needs_compiler
@pytest.mark.parametrize(("batch", "k", "d_sae", "d"), [(512, 32, 2048, 64), (37, 5, 1000, 50),
                                                        (3, 1, 16, 7), (256, 8, 4096, 576)])
def test_native_product_matches_torch_in_both_layouts(batch: int, k: int, d_sae: int, d: int) -> None:
    torch.manual_seed(batch)
    indices = torch.stack([torch.randperm(d_sae)[:k] for _ in range(batch)])  # distinct per row
    indices[: batch // 2, 0] = 3  # one frequent latent; most others never chosen
    weights, dense = torch.randn(batch * k), torch.randn(batch, d)
    want = _reference(indices, weights, dense, d_sae).float()
    rows_out = native_sparse.sparse_outer(indices, weights, dense, d_sae, transposed=False)
    columns_out = native_sparse.sparse_outer(indices, weights, dense, d_sae, transposed=True)
    assert rows_out is not None and columns_out is not None
    assert rows_out.shape == (d_sae, d) and columns_out.shape == (d, d_sae)
    assert columns_out.is_contiguous()  # W_enc's layout: the gradient accumulates without a copy
    torch.testing.assert_close(rows_out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(columns_out, rows_out.T)
    torch.testing.assert_close(sparse_transpose_matmul(indices, weights, dense, d_sae, transposed=True),
                               want.T, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_the_decoders_native_backward_gives_embedding_bags_gradients() -> None:
    torch.manual_seed(0)
    indices = torch.stack([torch.randperm(700)[:12] for _ in range(90)])  # [90, 12] of 700 latents
    values, W_dec, grad = torch.rand(90, 12), torch.randn(700, 70), torch.randn(90, 70)
    got, want = [], []
    for decode, out in ((sparse_decode, got), (F.embedding_bag, want)):
        v, W = values.clone().requires_grad_(), W_dec.clone().requires_grad_()
        x_hat = decode(indices, W, per_sample_weights=v, mode="sum") if decode is F.embedding_bag \
            else decode(indices, v, W)
        x_hat.backward(grad)
        out += [x_hat.detach(), v.grad, W.grad]
    assert native_sparse.decoder_backward_applies(indices, values, W_dec)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_torch_fallback_gives_the_same_product(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEWORKS_NATIVE", "0")
    torch.manual_seed(0)
    indices, weights, dense = torch.randint(0, 512, (64, 8)), torch.randn(64 * 8), torch.randn(64, 40)
    assert native_sparse.sparse_outer(indices, weights, dense, 512, transposed=True) is None
    got = sparse_transpose_matmul(indices, weights, dense, 512, transposed=True)
    torch.testing.assert_close(got, _reference(indices, weights, dense, 512).float().T, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_an_index_outside_the_latents_is_an_error_not_a_crash() -> None:
    indices = torch.tensor([[0, 5], [2, 512]])
    with pytest.raises(IndexError, match=r"outside \[0, 512\).*0\.\.512"):
        native_sparse.sparse_outer(indices, torch.ones(4), torch.ones(2, 8), 512, transposed=True)


@needs_compiler
def test_a_training_step_has_the_same_gradients_native_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=48, d_sae=1024, architecture="topk", k=8))
    x = torch.randn(300, 48) * 2
    dead = torch.rand(1024) < 0.3  # with AuxK
    grads = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("SAEWORKS_NATIVE", setting)
        sae.zero_grad(set_to_none=True)
        sae.training_forward(x, TrainContext(0.0, dead)).loss.backward()
        grads[setting] = {name: p.grad.clone() for name, p in sae.named_parameters()}
    for name, grad in grads["1"].items():
        torch.testing.assert_close(grad, grads["0"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert grads["1"]["W_enc"].is_contiguous()


LOSSES = ("mse", "x_hat", "both")
"""What a test loss reads: the mse only (the fused backward never forms x_hat's gradient), a
per-column weighting of x_hat only, or both."""


def _topk_step(sae: TopKSAE, x: torch.Tensor, fused: bool, autocast: bool,
               loss: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(every parameter's gradient, x_hat, mse) of one TopK selection's `loss` (LOSSES), through
    `topk_reconstruction` or through the chain it replaces; the forward under bfloat16 autocast
    or not, the backward outside it (as the trainer runs them)."""
    sae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        x_hat, values, mse = _topk_forward(sae, x, fused)
    weights = torch.linspace(0.5, 2.0, x.shape[1])  # a gradient that differs per column
    weighted = ((x_hat.float() - x).pow(2) * weights).sum() / 100
    (mse if loss == "mse" else weighted if loss == "x_hat" else mse + weighted).backward()
    assert (values > 0).sum() > 0
    return {name: p.grad.clone() for name, p in sae.named_parameters()}, x_hat.detach(), mse.detach()


def _topk_forward(sae: TopKSAE, x: torch.Tensor,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_centred = sae.centred(x)
    pre, selected, indices = sae.selected_dense(x_centred)
    if fused:
        out = topk_reconstruction(selected, x, x_centred, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                                  indices, sae.cfg.apply_b_dec_to_input)
        assert out is not None, "the fused path should apply to float32 on a CPU"
        return out
    values = selected_pre_activations(pre, x_centred, sae.W_enc, sae.b_enc, indices, selected)
    if sae.cfg.apply_b_dec_to_input:
        values = encoder_b_dec_grad(values, sae.b_dec, sae.W_enc, indices)
    values = values.relu()
    x_hat = sparse_decode(indices, values, sae.W_dec) + sae.b_dec
    return x_hat, values, mse_per_row(x, x_hat)


@needs_compiler
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("loss", LOSSES)
def test_the_fused_topk_step_gives_the_chains_numbers_and_gradients(apply_b_dec: bool, autocast: bool,
                                                                     loss: str) -> None:
    """topk_reconstruction's forward (decode_error) and one-sort backward = selected_pre_activations
    -> encoder_b_dec_grad -> ReLU -> sparse_decode + b_dec -> mse_per_row through autograd, also
    under bfloat16 autocast (ReLU's gradient rounded to the selection's dtype in both), with a
    b_dec that matters (not zero), some ReLU'd entries and d_in = 200 (passes of 8, 4 and 1
    vectors of 16 and 8 scalar columns in decode_error)."""
    torch.manual_seed(3)
    d_in = 200
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=2048, architecture="topk", k=16,
                            apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in) * 0.3)
        sae.b_enc.copy_(torch.randn(2048) * 0.5 - 0.6)  # some selected pre-activations negative
    x = torch.randn(384, d_in) * 2
    (fused, x_hat, mse), (chain, chain_x_hat, chain_mse) = (_topk_step(sae, x, True, autocast, loss),
                                                          _topk_step(sae, x, False, autocast, loss))
    torch.testing.assert_close(x_hat, chain_x_hat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mse, chain_mse, rtol=1e-6, atol=0)
    assert set(fused) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert all(grad.is_contiguous() for grad in fused.values())
    if autocast and loss != "x_hat":
        # under autocast the values' gradient is rounded to bfloat16: computed in another order (the
        # dots scaled, not the scaled error's dots; 16 or 8 lanes), a float32 gradient can round to
        # the neighbouring bfloat16 (seen: one entry, its latent's b_enc off by 6e-5 and W_enc column
        # by up to 1.5e-3 where the gradient reaches 4.1). Only such a latent may differ, by about
        # its x-weighted ulp; all others as without autocast.
        flipped = ((fused["b_enc"] - chain["b_enc"]).abs() > 1e-5 * (1 + chain["b_enc"].abs())) \
            | ((fused["W_enc"] - chain["W_enc"]).abs() > 1e-5 * (1 + chain["W_enc"].abs())).any(0)
        assert int(flipped.sum()) <= 2, f"{int(flipped.sum())} latents' gradients differ"
        for name in ("W_enc", "b_enc"):
            latents = -1 if name == "W_enc" else 0
            ulp = 2 * torch.finfo(torch.bfloat16).eps * chain[name].abs().max()
            torch.testing.assert_close(fused[name].index_select(latents, flipped.nonzero().squeeze(1)),
                                       chain[name].index_select(latents, flipped.nonzero().squeeze(1)),
                                       rtol=0, atol=float(ulp), msg=name)
            fused[name] = fused[name].index_select(latents, (~flipped).nonzero().squeeze(1))
            chain[name] = chain[name].index_select(latents, (~flipped).nonzero().squeeze(1))
    for name, grad in fused.items():
        torch.testing.assert_close(grad, chain[name], rtol=1e-5, atol=1e-5, msg=name)
    assert fused["b_dec"].abs().max() > 0 and fused["b_enc"].abs().max() > 0


@needs_compiler
def test_the_fused_topk_step_gives_x_its_gradient_through_the_mse() -> None:
    """An input that requires grad gets the mse's gradient, -2 (x_hat - x) / rows, as the chain's
    mse_per_row gives it (the decode itself reads x only through the detached centred copy)."""
    torch.manual_seed(4)
    sae = TopKSAE(SAEConfig(d_in=48, d_sae=512, architecture="topk", k=8, apply_b_dec_to_input=False))
    x = torch.randn(64, 48, requires_grad=True)
    x_hat, _, mse = _topk_forward(sae, x, True)
    mse.backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, -2 * (x_hat - x).detach() / 64)


@needs_compiler
def test_decode_error_names_a_latent_outside_the_decoder() -> None:
    indices = torch.tensor([[0, 3], [2, 70]])
    with pytest.raises(IndexError, match=r"outside \[0, 64\).*0\.\.70"):
        native_sparse.decode_error(indices, torch.ones(2, 2), torch.ones(64, 8), torch.zeros(8),
                                   torch.ones(2, 8))


@needs_compiler
def test_the_fused_topk_backward_names_a_latent_outside_the_dictionary() -> None:
    indices = torch.tensor([[0, 3], [2, 70]])
    with pytest.raises(IndexError, match=r"outside \[0, 64\).*0\.\.70"):
        native_sparse.topk_backward(indices, torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 8),
                                    torch.ones(2, 8), 64)


@needs_compiler
def test_a_lookup_row_outside_the_matrix_is_an_error_not_a_crash() -> None:
    row_start, features, values = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2]), torch.ones(3)
    found = native_sparse.sparse_lookup(row_start, features, values, torch.tensor([0, 0, 1, 1]),
                                        torch.tensor([4, 2, 2, 1]))
    assert found is not None and found.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(IndexError, match=r"outside \[0, 2\)"):
        native_sparse.sparse_lookup(row_start, features, values, torch.tensor([2]), torch.tensor([1]))


@needs_compiler
def test_a_window_lookup_stays_inside_each_query_rows_window() -> None:
    """Rows in windows of 2: row 1's window is rows 0-1, row 2's rows 2-3; a row past the end is an
    IndexError."""
    row_start = torch.tensor([0, 2, 3, 4, 4])  # row 0: latents 1, 4; row 1: 2; row 2: 1; row 3: none
    features, values = torch.tensor([1, 4, 2, 1]), torch.tensor([1.0, 2.0, 3.0, 5.0])
    tokens = torch.tensor([10, 11, 12, 13])
    found = native_sparse.sparse_window_lookup(row_start, features, values, tokens, torch.tensor([1, 2]),
                                               torch.tensor([1, 1]), 2, 1, 1)
    assert found is not None
    assert found[0].tolist() == [[10, 11, -1], [-1, 12, 13]]
    assert found[1].tolist() == [[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]]
    with pytest.raises(IndexError, match=r"outside \[0, 4\)"):
        native_sparse.sparse_window_lookup(row_start, features, values, tokens, torch.tensor([4]),
                                           torch.tensor([1]), 2, 1, 1)
