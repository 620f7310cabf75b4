"""`sae.sparse.top_k`, the blocked top-k of the TopK family, finds exactly torch.topk's entries."""

from __future__ import annotations

import pytest
import torch

from saeworks.sae.sparse import top_k


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
