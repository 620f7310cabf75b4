"""The native kernels built for narrower vector registers than this CPU's give the same answers.

The kernels hold their sums and comparisons at the register width of the CPU they are built on
(sae/kernels/vectors.h: 16 floats with AVX-512, 8 with AVX2, 4 with SSE), with as many of them in
flight as its registers hold. A test run sees only its own machine's width; here each kernel is
built again with an x86 vector extension taken away (a compiler wrapper that appends -mno-...) and
checked against torch by the tests that check the native build: the same entries, products,
gradients and Adam steps at every width.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from saeworks.sae import native
from saeworks.sae.sparse import bias_top_k_
from tests import test_native_step, test_refined_selection, test_sparse_grad, test_top_k

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector extensions"),
    pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine"),
]


def build_without(flag: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Every kernel loaded from here on is built (into a fresh cache) by a compiler that takes the
    flags of -march=native plus `flag` (one extension taken away)."""
    narrowing = tmp_path / "cc-narrower"
    narrowing.write_text(f'#!/bin/sh\nexec {native.compiler()} "$@" {flag}\n')
    narrowing.chmod(0o755)
    monkeypatch.setenv("SAEWORKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(narrowing))
    monkeypatch.setattr(native, "_libraries", {})
    return flag


@pytest.fixture(params=["-mno-avx512f", "-mno-avx"], ids=["avx2", "sse"])
def narrower_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Every kernel loaded in the test is built for a narrower vector width."""
    return build_without(str(request.param), monkeypatch, tmp_path)


@pytest.fixture(params=["-mno-avx512f", "-mno-avx", "-mno-avx512bf16"], ids=["avx2", "sse", "avx512-no-bf16"])
def top_k_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """As narrower_build, and AVX-512 without its bfloat16 instructions (bias_top_k's bfloat16 rows
    round with vcvtneps2bf16 where it has them, by integer adds where not)."""
    return build_without(str(request.param), monkeypatch, tmp_path)


def test_bias_top_k_selects_as_torch(top_k_build: str) -> None:
    assert native.library("bias_top_k") is not None
    torch.manual_seed(0)
    pre = torch.randn(33, 9216) * 2
    pre[:, :50] += 3  # winners crowded into few blocks
    test_top_k._check(pre, torch.randn(9216), 32)
    test_top_k._check(pre[:, :2048].to(torch.bfloat16), torch.randn(2048), 8)
    test_top_k._check(pre[:6, :16 * 37].to(torch.bfloat16), torch.randn(16 * 37), 8)  # a slice's tail
    test_top_k.test_bias_top_k_rounds_bfloat16_denormal_sums_as_torch()
    ties = torch.zeros(3, 2048)
    ties[0, 100 + torch.arange(20) * 37] = 1.0  # 20 tied for 8 places, in many blocks
    ties[1] = -1.0  # every column tied
    ties[2, torch.arange(7) * 3] = torch.arange(2.0, 9.0)
    values, indices = bias_top_k_(ties.clone(), torch.zeros(2048), 8)
    assert torch.equal(values.sort(-1).values, ties.topk(8, dim=-1).values.sort(-1).values)
    assert torch.equal(ties.gather(-1, indices), values)
    assert all(row.unique().numel() == 8 for row in indices)


def test_the_refined_selection_certifies_the_float32_top_k(narrower_build: str) -> None:
    assert native.library("bias_top_k") is not None
    for d_in, d_sae in ((37, 1040), (64, 1040)):  # the transpose element by element, by lines
        test_refined_selection.test_encoder_copies_are_the_transpose_the_rounding_and_their_norms(d_in, d_sae)
    test_refined_selection.test_the_kernel_certifies_only_the_float32_top_k(300, 200, 4096, 32)
    test_refined_selection.test_the_kernel_certifies_only_the_float32_top_k(7, 33, 1024, 1)


def test_sparse_products_and_the_fused_step_match_torch(narrower_build: str) -> None:
    assert native.library("sparse_grad") is not None
    test_sparse_grad.test_native_product_matches_torch_in_both_layouts(37, 5, 1000, 50)
    test_sparse_grad.test_native_product_matches_torch_in_both_layouts(512, 32, 2048, 64)
    test_sparse_grad.test_the_decoders_native_backward_gives_embedding_bags_gradients()
    for apply_b_dec in (True, False):
        test_sparse_grad.test_the_fused_topk_step_gives_the_chains_numbers_and_gradients(apply_b_dec, False,
                                                                                         "both")


def test_the_native_optimiser_step_equals_torchs(narrower_build: str) -> None:
    assert native.library("adam_step") is not None
    test_native_step.test_native_step_equals_the_torch_step("topk", 1.0)
