"""A TopK SAE's top k chosen from a bfloat16 encoder product and decided in float32.

The dense encoder product x @ W_enc [rows, d_sae] is the one cost of a TopK step or encode that
grows with d_sae times d_in; every other part touches k latents per row. On a CPU whose bfloat16
matmuls are much faster than float32 (AMX: [4096 x 576] @ [576 x 9216] in 16 against 133 ms),
the product runs in bfloat16 and only chooses: every latent whose bfloat16 pre-activation comes
within twice a bound on the bfloat16 error of the row's k-th is a candidate (about 2k on the demo
SAE), their float32 pre-activations are computed exactly (k-sparse dot products), and the bound
shows that no other latent reaches the k-th of them (sae/kernels/bias_top_k.c, "Refined
selection"). A row with more than MOST_CANDIDATES candidates (13 of 16,384 on the demo SAE) is
computed densely in float32. So the answer is the float32 top k, values in float32 — what the dense
float32 path gives, up to float32 rounding (the order of a dot product's sums) — and training's
gradients and quality do not change.

Where it runs: float32 weights and inputs on a CPU with the native kernels, no autocast, a width
of at least 64k. Whether it is faster is measured, not assumed (bfloat16 matmuls have measured
0.7x the speed of float32 on a CPU without AMX): the first call of each shape times both paths
once and keeps the faster (products of at least SMALLEST_MEASURED multiply-adds; smaller ones keep
the dense path). SAEWORKS_REFINED_SELECTION=1 uses it wherever it can run, 0 never.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from collections.abc import Callable

import torch

from saeworks.sae import native_sparse
from saeworks.sae.sparse import bias_top_k_, workspace, workspace_buffer

MOST_CANDIDATES = 256
"""A row whose bfloat16 values crowd so close to its k-th that more latents than this are
candidates is computed densely instead (each candidate is a dot product of d_in)."""

SMALLEST_MEASURED = 1 << 30
"""Multiply-adds of the dense product (rows x d_in x d_sae) below which "auto" does not measure
and keeps the dense path: a product of under about 10 ms is too short to time fairly once, and the
refined selection cannot save much of it (the demo's is 2^34.3, a test's often 2^25)."""

_faster: dict[tuple[int, ...], bool] = {}
_product_checked: dict[tuple[int, ...], bool] = {}


def mode() -> str:
    """SAEWORKS_REFINED_SELECTION: "auto" (default: measured per shape), "on" or "off"."""
    value = os.environ.get("SAEWORKS_REFINED_SELECTION", "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    return "auto"


def applies(W_enc: torch.Tensor, x_centred: torch.Tensor, k: int) -> bool:
    """Whether the refined selection can run for this encoder, input and k (see the module)."""
    width = W_enc.shape[-1]
    return mode() != "off" and W_enc.device.type == "cpu" and W_enc.dtype == torch.float32 \
        and x_centred.dtype == torch.float32 and x_centred.dim() == 2 and x_centred.shape[0] > 0 \
        and not torch.is_autocast_enabled("cpu") and width % 16 == 0 \
        and 64 * k <= width and 2 * k <= MOST_CANDIDATES \
        and native_sparse.encoder_copies_applies()


def refined_top_k(W_enc: torch.Tensor, b_enc: torch.Tensor, x_centred: torch.Tensor, k: int,
                  dense: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values [rows, k] float32 with b_enc in, indices [rows, k] ascending) of each row's k
    largest of x_centred @ W_enc + b_enc, or None where the refined selection does not run here
    (`applies`, or measured slower than `dense`: the caller's float32 path, which answers the same
    (values, indices), each row ascending, and is timed against it once per shape; in "auto" mode
    a product smaller than SMALLEST_MEASURED multiply-adds keeps the dense path unmeasured), or
    where this machine's bfloat16 matmul is not what the bound assumes (a warning says so)."""
    if not applies(W_enc, x_centred, k):
        return None
    if mode() == "on":
        return _select(W_enc, b_enc, x_centred, k)
    if x_centred.shape[0] * W_enc.shape[0] * W_enc.shape[1] < SMALLEST_MEASURED:
        return None
    key = _shape_key(x_centred.shape[0], W_enc.shape[0], W_enc.shape[1], k)
    faster = _faster.get(key)
    if faster is None:
        faster, answer = _measure(W_enc, b_enc, x_centred, k, dense)
        _faster[key] = faster
        return answer
    return _select(W_enc, b_enc, x_centred, k) if faster else None


def _measure(W_enc: torch.Tensor, b_enc: torch.Tensor, x_centred: torch.Tensor, k: int,
             dense: Callable[[], tuple[torch.Tensor, torch.Tensor]]
             ) -> tuple[bool, tuple[torch.Tensor, torch.Tensor] | None]:
    """Both paths twice (the first call of each builds kernels and buffers), timed the second
    time: (whether the refined one was faster, its answer, or None to have the caller's). Once per
    shape (`_shape_key`) and process. The dense path first, so that its float32 buffer is freed
    before the refined path's bfloat16 one and the encoder copies are allocated."""
    seconds: list[float] = []
    for path in (dense, lambda: _select(W_enc, b_enc, x_centred, k)):
        if path() is None:  # this machine's bfloat16 product is not as the bound assumes
            return False, None
        start = time.perf_counter()
        path()
        seconds.append(time.perf_counter() - start)
    faster = seconds[1] < seconds[0]
    return faster, (_select(W_enc, b_enc, x_centred, k) if faster else None)


def _select(W_enc: torch.Tensor, b_enc: torch.Tensor, x_centred: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The refined selection's (values, indices); None where this machine's bfloat16 product is
    not what the bound assumes (`_product_as_assumed`, checked once per shape)."""
    key = _shape_key(x_centred.shape[0], W_enc.shape[0], W_enc.shape[1], k)
    if _product_checked.get(key) is False:
        return None
    x = x_centred.detach().contiguous()
    # the buffer first: it replaces a dense path's float32 one before the copies are allocated
    products = workspace_buffer((x.shape[0], W_enc.shape[1]), torch.bfloat16, x.device)  # [rows, d_sae]
    copies = encoder_copies(W_enc)
    x_rounded = x.to(torch.bfloat16)  # [rows, d_in]
    bfloat16_product(x_rounded, copies.rounded, products)
    if key not in _product_checked:
        _product_checked[key] = _product_as_assumed(x_rounded, copies.rounded, products)
        if not _product_checked[key]:
            warnings.warn("saeworks: this machine's bfloat16 matmul does not accumulate in float32 as the "
                          "refined selection's bound assumes; TopK encodes use the dense float32 path "
                          "(same results)", RuntimeWarning, stacklevel=4)
    if not _product_checked[key]:
        return None
    selection = native_sparse.refined_top_k(products, b_enc.detach(), x, x_rounded, copies, k,
                                            MOST_CANDIDATES)
    if selection is None:
        raise RuntimeError("refined_top_k did not apply after `applies` said it would")
    values, indices = selection.values, selection.indices
    rows = selection.uncertified
    if len(rows):  # those rows densely, in float32
        pre = x.index_select(0, rows) @ W_enc.detach()  # [n, d_sae]
        row_values, row_indices = bias_top_k_(pre, b_enc.detach(), k, ascending=True)
        values[rows] = row_values
        indices[rows] = row_indices
    return values, indices


def bfloat16_product(x_rounded: torch.Tensor, W_rounded: torch.Tensor, out: torch.Tensor) -> None:
    """out [rows, d_sae] = x_rounded @ W_rounded, both bfloat16, by torch's CPU BLAS (oneDNN)."""
    torch.mm(x_rounded, W_rounded, out=out)


def _product_as_assumed(x_rounded: torch.Tensor, W_rounded: torch.Tensor, products: torch.Tensor) -> bool:
    """Whether `products` = x_rounded @ W_rounded summed in float32 and rounded once to bfloat16, as
    the bound assumes (|error| <= u'|product| + gamma sum_i |x_i w_ij|), on up to 8 rows and 2,048
    latents against a float64 product: a BLAS that kept partial sums in bfloat16 would fail it."""
    rows, columns = min(8, x_rounded.shape[0]), min(2048, W_rounded.shape[1])
    x = x_rounded[:rows].double()  # [rows, d_in]
    W = W_rounded[:, :columns].double()  # [d_in, columns]
    got = products[:rows, :columns].double()
    u = 2.0 ** -8 / (1 - 2.0 ** -8)
    gamma = 2.0 * x.shape[1] * 2.0 ** -24
    exact = x @ W  # [rows, columns]
    allowed = u * got.abs() + gamma * (x.abs() @ W.abs()) + 1e-30
    return bool((((got - exact).abs() <= allowed) | ~exact.isfinite()).all())  # NaN, inf: no verdict


def encoder_copies(W_enc: torch.Tensor) -> native_sparse.EncoderCopies:
    """W_enc's copies for the refined selection. One set per thread, in the workspace of
    sae/sparse.py (the pre-activation buffer's): kept while W_enc is the same tensor with the same
    storage and version (an in-place update bumps the version: torch's ops, and the native Adam
    step), else written again into the same memory where the shapes fit (a training step, or the
    next SAE of a sweep: fresh pages cost more than the pass). Per thread, not per SAE: a sweep's
    SAEs would each hold 1.5x their W_enc."""
    slot = workspace()
    kept: tuple[weakref.ref[torch.Tensor], int, int | None, native_sparse.EncoderCopies] | None = \
        getattr(slot, "encoder_copies", None)
    version = None if W_enc.is_inference() else W_enc._version  # an inference tensor has none: no reuse
    if kept is not None and version is not None and kept[0]() is W_enc \
            and kept[1:3] == (W_enc.data_ptr(), version):
        return kept[3]
    slot.encoder_copies = None
    copies = native_sparse.encoder_copies(W_enc, into=kept[3] if kept is not None else None)
    if copies is None:
        raise RuntimeError("encoder_copies did not apply after `applies` said it would")
    slot.encoder_copies = (weakref.ref(W_enc), W_enc.data_ptr(), version, copies)
    return copies


def chosen_for(rows: int, d_in: int, d_sae: int, k: int) -> bool:
    """Whether the refined selection ran (or would run: mode "on") for this shape in this process."""
    if mode() == "off":
        return False
    return mode() == "on" or _faster.get(_shape_key(rows, d_in, d_sae, k), False)


def _shape_key(rows: int, d_in: int, d_sae: int, k: int) -> tuple[int, ...]:
    """What a measurement holds for: the rows rounded up to a power of two (an evaluation's batches
    differ in length; each would be measured again), the encoder's shape, k and the threads."""
    return (1 << max(rows - 1, 0).bit_length(), d_in, d_sae, k, torch.get_num_threads())


def forget_measurements() -> None:
    """Drop the per-shape timings and product checks (tests, or a process whose load changed)."""
    _faster.clear()
    _product_checked.clear()
