"""`sae.sparse.top_k` and `bias_top_k_`, the top-k of the TopK family, find exactly torch.topk's entries."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from saeworks.sae import native, native_sparse
from saeworks.sae.sparse import bias_top_k_, top_k


@pytest.mark.parametrize(("shape", "k"), [((64, 4096), 32), ((3, 5, 2048), 8), ((7, 1024), 16),
                                          ((16, 1000), 4), ((8, 256), 32)])
def test_top_k_finds_the_same_entries_as_torch_topk(shape: tuple[int, ...], k: int) -> None:
    torch.manual_seed(0)
    pre = torch.randn(shape) + torch.randn(shape[-1]) * 2  # latents of different scales
    pre[..., :50] += 3  # some columns (in few blocks) hold many winners
    values, indices = top_k(pre, k)
    want_values, want_indices = pre.topk(k, dim=-1)
    assert indices.shape == values.shape == (*shape[:-1], k)
    assert torch.equal(indices.sort(-1).values, want_indices.sort(-1).values)
    assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
    assert torch.equal(pre.gather(-1, indices), values)


def test_top_k_when_all_winners_share_one_block() -> None:
    width, k = 4096, 16
    pre = torch.zeros(2, width)
    winners = torch.arange(k) * (width // 16)  # 16 columns of block 0
    pre[:, winners] = torch.arange(1.0, k + 1)
    _, indices = top_k(pre, k)
    assert torch.equal(indices.sort(-1).values[0], winners)


# `sae.sparse.bias_top_k_`: bias add and selection in one pass (the native kernel where a C compiler
# exists, torch ops where not); both must give what `pre.add_(bias)` then torch.topk give.

def _reference(pre: torch.Tensor, bias: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    added = pre.clone().add_(bias.to(pre.dtype))
    values, indices = added.topk(k, dim=-1)
    return added, values, indices


def _check(pre: torch.Tensor, bias: torch.Tensor, k: int) -> None:
    added, want_values, want_indices = _reference(pre, bias, k)
    values, indices = bias_top_k_(pre, bias, k, ascending=True)
    assert torch.equal(pre, added)  # the bias is in, bit for bit as add_ puts it
    assert (indices.diff(dim=-1) > 0).all()  # each row's entries by ascending column
    assert values.dtype == pre.dtype and indices.shape == values.shape == (pre.shape[0], k)
    assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
    assert torch.equal(pre.gather(-1, indices), values)
    if pre.dtype == torch.float32:  # bfloat16 rows tie often: the same values, maybe other columns
        assert torch.equal(indices.sort(-1).values, want_indices.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "width", "k"), [(257, 9216, 32), (7, 2048, 8), (1, 1024, 16),
                                                  (5, 4096, 64), (3, 1000, 4), (4, 512, 16),
                                                  (6, 16 * 37, 8)])  # blocks not a multiple of 16
def test_bias_top_k_adds_the_bias_and_selects_as_torch(dtype: torch.dtype, rows: int, width: int,
                                                       k: int) -> None:
    torch.manual_seed(rows)
    pre = (torch.randn(rows, width) * 2).to(dtype)
    pre[:, :50] += 3  # winners crowded into few blocks
    bias = torch.randn(width)
    _check(pre, bias, k)


def test_the_native_kernel_is_built_where_a_compiler_exists() -> None:
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine: bias_top_k_ uses torch ops (tested above)")
    pre, bias = torch.randn(8, 2048), torch.randn(2048)
    assert native_sparse.bias_top_k_(pre.clone(), bias, 8) is not None
    assert native_sparse.bias_top_k_(pre.to(torch.bfloat16), bias, 8) is not None
    assert native_sparse.bias_top_k_(pre[:, :1000].contiguous(), bias[:1000], 8) is None  # not 16 blocks


def test_bias_top_k_when_all_winners_share_one_block_and_ties() -> None:
    width, k = 4096, 16
    pre = torch.zeros(3, width)
    winners = torch.arange(k) * (width // 16)  # 16 columns of interleaved block 0
    pre[:2, winners] = torch.arange(1.0, k + 1)
    _, indices = bias_top_k_(pre.clone(), torch.zeros(width), k)
    assert torch.equal(indices.sort(-1).values[:2], winners.expand(2, k))
    assert (indices[2] >= 0).all() and indices[2].unique().numel() == k  # all tied: k distinct columns


@pytest.mark.parametrize("width", [2048, 9216])
def test_bias_top_k_with_ties_at_the_threshold(width: int) -> None:
    """Rows whose k-th largest value is tied (a few, or every column: more candidates than the
    kernel ranks by counting, and more equal block maxima than it counts among): the k largest
    values, on k distinct columns that hold them."""
    k = 8
    pre = torch.zeros(4, width)
    pre[0, torch.arange(7) * 3] = torch.arange(2.0, 9.0)  # 7 clear winners ...
    pre[0, 100 + torch.arange(20) * 37] = 1.0  # ... and 20 tied for the last place, in many blocks
    pre[1, 5 + torch.arange(300) * 5] = 1.0  # 300 tied: more than are ranked by counting
    pre[2] = -1.0  # every column tied, every block maximum equal
    pre[3, 11] = 5.0  # one winner, then all tied
    values, indices = bias_top_k_(pre.clone(), torch.zeros(width), k, ascending=True)
    want = pre.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1).values, want.sort(-1).values)
    assert torch.equal(pre.gather(-1, indices), values)
    assert (indices.diff(dim=-1) > 0).all()  # k distinct columns, ascending (the heap's too)


def test_bias_top_k_rounds_bfloat16_denormal_sums_as_torch() -> None:
    """Sums below float's smallest normal keep their denormal bfloat16 bits (vcvtneps2bf16, where
    the kernel uses it, would flush them to zero): the row written back is torch's add, bit for bit."""
    torch.manual_seed(1)
    width = 2048
    pre = torch.randn(3, width).to(torch.bfloat16)
    tiny = torch.finfo(torch.float32).tiny
    pre[0, :40] = torch.tensor(3e-39).to(torch.bfloat16)  # denormal already
    pre[1, 7::16] = torch.tensor(1.5 * tiny).to(torch.bfloat16)  # normal, denormal once the bias is in
    bias = torch.randn(width)
    bias[:40] = 0.0
    bias[7::16] = -tiny
    added, _, _ = _reference(pre, bias, 8)
    assert (added.float().abs() < tiny).logical_and(added != 0).sum() >= 40 + width // 16
    _check(pre, bias, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_top_k_with_nan_rows_answers_as_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    pre, bias = torch.randn(6, 2048).to(dtype), torch.randn(2048)
    pre[3, 100] = float("nan")
    added, _, want_indices = _reference(pre, bias, 8)
    values, indices = bias_top_k_(pre, bias, 8, ascending=True)
    assert torch.equal(pre.nan_to_num(), added.nan_to_num())
    assert torch.equal(indices, want_indices.sort(-1).values)  # NaN counts as largest; ascending
    assert torch.equal(pre.gather(-1, indices).nan_to_num(), values.nan_to_num())
    assert values[3].isnan().any()


def test_without_native_kernels_the_torch_ops_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEWORKS_NATIVE", "0")
    pre, bias = torch.randn(16, 2048), torch.randn(2048)
    assert native_sparse.bias_top_k_(pre.clone(), bias, 8) is None
    _check(pre, bias, 8)


def test_a_failing_compiler_warns_once_and_leaves_no_library(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("SAEWORKS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, exits 1
    monkeypatch.setattr(native, "_libraries", {})
    with pytest.warns(RuntimeWarning, match="bias_top_k is not available.*false"):
        assert native.library("bias_top_k") is None
    assert native.library("bias_top_k") is None  # remembered: no second build, no second warning
    assert not list((tmp_path / "kernels").iterdir())  # no partial library left behind
    _check(torch.randn(4, 2048), torch.randn(2048), 8)

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_libraries", {})
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.library("bias_top_k") is None


def test_a_compiler_without_openmp_builds_one_thread_kernels(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    cc = native.compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    refusing = tmp_path / "cc-without-openmp"  # as clang without libomp answers -fopenmp
    refusing.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && "
                        "{ echo 'unsupported option -fopenmp' >&2; exit 1; }; done\n"
                        f"exec {cc} \"$@\"\n")
    refusing.chmod(0o755)
    monkeypatch.setenv("SAEWORKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(refusing))
    monkeypatch.setattr(native, "_libraries", {})
    with pytest.warns(RuntimeWarning, match="bias_top_k was built without OpenMP.*unsupported option"):
        assert native.library("bias_top_k") is not None
    torch.manual_seed(0)
    _check(torch.randn(64, 2048), torch.randn(2048), 8)  # the same answers, on one thread


def test_a_damaged_cached_library_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cc = native.compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("SAEWORKS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_libraries", {})
    source = native.KERNELS_DIR / "bias_top_k.c"
    cached = native._library_path(source, cc, native.FLAG_SETS[0])
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a shared library")  # e.g. cut short by a full disk under another tool
    assert native.library("bias_top_k") is not None
    assert cached.read_bytes() != b"not a shared library"  # rebuilt in its place
    _check(torch.randn(4, 2048), torch.randn(2048), 8)


def _top_k_in_child() -> tuple[list[int], int]:
    pre = torch.arange(8 * 1024, dtype=torch.float32).view(8, 1024).flip(1).contiguous()
    _, indices = bias_top_k_(pre, torch.zeros(1024), 4)
    return indices.sort(-1).values[0].tolist(), native_sparse.threads()


def test_native_kernels_run_in_a_forked_child() -> None:
    """A child forked after the kernels ran on an OpenMP team (a DataLoader worker, a
    multiprocessing pool) has none of the team's threads: its kernels run on one thread instead
    of waiting forever for them (as torch's own parallel ops do there)."""
    torch.manual_seed(0)
    _check(torch.randn(64, 2048), torch.randn(2048), 8)  # the parent's team exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_top_k_in_child).get(timeout=120) == ([0, 1, 2, 3], 1)
    assert native_sparse.threads() == torch.get_num_threads()
