"""The TopK step's sparse pieces, each way of computing them, against the encoder matmul, on a device.

    python benchmarks/sparse_backward.py --device cuda --d-in 2304 --d-sae 65536 --batch-size 8192

A TopK step is one dense matmul (the encoder forward) plus work on the k active latents of each
row: the selection, the decode, and the encoder's and decoder's weight gradients, each a product
with a sparse [batch, d_sae] matrix. This times every way the code base (or torch) offers for each
piece on the same inputs, checks each result against a float64 reference (relative error), and
prints each as a fraction of the bare encoder matmul in the same dtype, so that the cheapest
correct way on a device is chosen by measurement. Times are medians over `--repeat` runs, each
ending in a synchronisation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from saeworks.sae.limits import MatmulProbe, synchronize
from saeworks.sae.sparse import block_top_k, csr_transpose_matmul, row_dots, sparse_transpose_matmul


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of `fn` (after two warm-up calls), each call synchronised."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference||, in float64."""
    result = result.double()
    return float((result - reference).norm() / reference.norm())


def dense_transpose_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor,
                           d_sae: int, dtype: torch.dtype) -> torch.Tensor:
    """[d_sae, d] = M^T @ dense with M scattered into a dense [batch, d_sae] matrix of `dtype`."""
    batch, k = indices.shape
    m = torch.zeros(batch, d_sae, dtype=dtype, device=dense.device)
    m.scatter_(1, indices, values.view(batch, k).to(dtype))
    return (m.T @ dense.to(dtype)).float()


def index_add_transpose_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor,
                               d_sae: int) -> torch.Tensor:
    """[d_sae, d] = M^T @ dense as an index_add of the scaled rows (atomics on a GPU)."""
    k = indices.shape[1]
    rows = dense.repeat_interleave(k, dim=0) * values[:, None]  # [batch * k, d]
    return torch.zeros(d_sae, dense.shape[1], device=dense.device).index_add_(0, indices.reshape(-1), rows)


def embedding_bag_weight_grad(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor,
                              W_dec: torch.Tensor) -> torch.Tensor:
    """W_dec's gradient [d_sae, d] of sum(embedding_bag(indices, W_dec, values) * dense), by autograd."""
    weight = W_dec.detach().requires_grad_(True)
    out = F.embedding_bag(indices, weight, per_sample_weights=values.view(indices.shape), mode="sum")
    (grad,) = torch.autograd.grad(out, weight, dense)
    return grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    device, batch, d_in, d_sae, k = torch.device(args.device), args.batch_size, args.d_in, args.d_sae, args.k
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d_in, device=device, generator=generator)  # [batch, d_in]
    W_enc = torch.randn(d_in, d_sae, device=device, generator=generator) / d_in ** 0.5
    W_dec = W_enc.T.contiguous()  # [d_sae, d_in]
    pre = x @ W_enc  # [batch, d_sae]
    indices = pre.topk(k, dim=1).indices  # [batch, k]
    values = torch.randn(batch * k, device=device, generator=generator)  # a gradient per entry
    reference = torch.zeros(d_sae, d_in, dtype=torch.float64, device=device).index_add_(
        0, indices.reshape(-1), x.double().repeat_interleave(k, dim=0) * values.double()[:, None])
    rows: list[tuple[str, str, float, float]] = []
    for dtype in (torch.float32, torch.bfloat16):
        probe = MatmulProbe(batch, d_in, d_sae, dtype, device)
        limit = statistics.median(probe() for _ in range(args.repeat))
        rows.append((f"encoder matmul {dtype}", "limit", limit, 0.0))
    limit32 = rows[0][2]

    def add(name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None) -> None:
        error = relative_error(fn(), ref) if ref is not None else float("nan")
        rows.append((name, "", median_seconds(fn, device, args.repeat), error))

    add("W_enc grad: sparse_transpose_matmul (as trained)",
        lambda: sparse_transpose_matmul(indices, values, x, d_sae), reference)
    add("W_enc grad: CSR @ dense", lambda: csr_transpose_matmul(indices, values, x, d_sae), reference)
    add("W_enc grad: index_add of scaled rows",
        lambda: index_add_transpose_matmul(indices, values, x, d_sae), reference)
    add("W_enc grad: dense scatter + matmul fp32",
        lambda: dense_transpose_matmul(indices, values, x, d_sae, torch.float32), reference)
    add("W_enc grad: dense scatter + matmul bf16",
        lambda: dense_transpose_matmul(indices, values, x, d_sae, torch.bfloat16), reference)
    add("W_dec grad: embedding_bag backward",
        lambda: embedding_bag_weight_grad(indices, values, x, W_dec), reference)
    dense_grad = torch.randn(batch, d_in, device=device, generator=generator)  # the decode's gradient
    dots_reference = (W_dec.double()[indices] * dense_grad.double().unsqueeze(1)).sum(-1)  # [batch, k]
    add("values grad: row_dots (as trained)", lambda: row_dots(indices, W_dec, dense_grad), dots_reference)
    weights = values.view(batch, k).clone().requires_grad_(True)
    decoded = F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum")
    add("values grad: embedding_bag per-sample backward",
        lambda: torch.autograd.grad(decoded, weights, dense_grad, retain_graph=True)[0], dots_reference)
    add("decode: embedding_bag forward",
        lambda: F.embedding_bag(indices, W_dec, per_sample_weights=values.view(batch, k), mode="sum"), None)
    add("top-k: torch.topk fp32", lambda: pre.topk(k, dim=1, sorted=False).values, None)
    pre16 = pre.bfloat16()
    add("top-k: torch.topk bf16", lambda: pre16.topk(k, dim=1, sorted=False).values, None)
    add("top-k: block_top_k fp32", lambda: block_top_k(pre, k)[0], None)
    add("top-k: block_top_k bf16", lambda: block_top_k(pre16, k)[0], None)
    block_values = block_top_k(pre16, k)[0].sort(dim=1).values
    same = bool((block_values == pre16.topk(k, dim=1).values.sort(dim=1).values).all())
    print(f"block_top_k bf16 values equal torch.topk's: {same}")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"batch {batch}, d_in {d_in}, d_sae {d_sae}, k {k}, torch {torch.__version__}")
    for name, note, seconds, error in rows:
        ratio = seconds / limit32
        extra = note or (f"rel err {error:.1e}" if error == error else "")
        print(f"{name:52s} {seconds * 1e3:9.3f} ms  {ratio:6.2f} x fp32 matmul  {extra}")


if __name__ == "__main__":
    main()
