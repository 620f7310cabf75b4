"""Training on a CUDA GPU gives the numbers it gives on the CPU: the sparse TopK path (CSR products,
block top-k, the decode's sparse backward) against the dense autograd reference, and whole trainer
steps against the same steps on the CPU. Skipped where no GPU is visible (CI has none): run
`pytest tests/test_cuda.py` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from saeworks.sae.base import TrainContext, mse_per_row
from saeworks.sae.config import SAEConfig
from saeworks.sae.registry import create_sae
from saeworks.sae.sparse import block_top_k
from saeworks.sae.topk import TopKSAE
from saeworks.train.config import TrainConfig
from saeworks.train.data import SourceInfo
from saeworks.train.plan import make_hooks_plan
from saeworks.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
CUDA = torch.device("cuda")


def _gradients(sae: TopKSAE, x: torch.Tensor, dense: bool) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of mse + a per-column weighting of x_hat, by the training forward
    or by the dense reference (all d_sae pre-activations under autograd, the top k kept)."""
    sae.zero_grad(set_to_none=True)
    if dense:
        x_hat = sae.dense_training_latents(x) @ sae.W_dec + sae.b_dec
        mse = mse_per_row(x, x_hat)
    else:
        out = sae.training_forward(x, TrainContext(0.0, None))
        x_hat, mse = out.x_hat, out.mse
    weights = torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype, device=x.device)
    (mse + ((x_hat - x).pow(2) * weights).sum() / 100).backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_the_sparse_topk_gradients_on_a_gpu_equal_the_dense_reference(apply_b_dec: bool) -> None:
    torch.manual_seed(0)
    d_in, d_sae = 96, 1024
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=16,
                            apply_b_dec_to_input=apply_b_dec)).double().to(CUDA)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(-0.6, 0.5)  # some selected pre-activations negative: ReLU'd
    x = torch.randn(300, d_in, dtype=torch.float64, device=CUDA) * 2
    sparse, dense = _gradients(sae, x, dense=False), _gradients(sae, x, dense=True)
    for name, grad in dense.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sparse[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_top_k_on_a_gpu_finds_torch_topks_values(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    pre = torch.randn(512, 4096, device=CUDA).to(dtype)
    values, indices = block_top_k(pre, 32)
    expected = pre.topk(32, dim=1).values
    assert torch.equal(values.sort(dim=1, descending=True).values, expected)
    assert torch.equal(pre.gather(1, indices), values)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_trainer_steps_on_a_gpu_equal_the_same_steps_on_the_cpu(architecture: str) -> None:
    """Three whole steps (forward, backward, projection, clipping, Adam, normalisation) in float32:
    the weights after them agree with the CPU's to float32 rounding."""
    cfg = SAEConfig(architecture=architecture, k=16, d_sae=2048).resolved(128)
    train_cfg = TrainConfig(saes=[cfg], batch_size=512, total_tokens=512 * 3, autocast="none")
    plan = make_hooks_plan(train_cfg, [SourceInfo("h", 128, "x", {}, {})], 1)
    torch.manual_seed(2)
    batches = [torch.randn(512, 128) for _ in range(3)]
    weights = {}
    for device in (torch.device("cpu"), CUDA):
        torch.manual_seed(3)
        sae = create_sae(cfg).to(device)
        trainer = Trainer([sae], plan, train_cfg, 1.0, device)
        for batch in batches:
            stats = trainer.forward_backward(trainer.prepare(batch))
            trainer.reduce(stats, False)
            trainer.optimizer_step()
            trainer.step += 1
        weights[device.type] = {name: p.detach().cpu() for name, p in sae.named_parameters()}
    for name, cpu in weights["cpu"].items():
        torch.testing.assert_close(weights["cuda"][name], cpu, rtol=1e-4, atol=1e-5, msg=name)


def test_a_topk_reconstruction_on_a_gpu_equals_the_dense_forward() -> None:
    """`reconstruct` (the evaluation's spliced forward) through the k active latents on the GPU."""
    torch.manual_seed(4)
    sae = TopKSAE(SAEConfig(d_in=96, d_sae=1024, architecture="topk", k=16)).to(CUDA)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        x = torch.randn(3, 50, 96, device=CUDA)
        torch.testing.assert_close(sae.reconstruct(x), sae(x), rtol=1e-5, atol=1e-5)
