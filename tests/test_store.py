"""Store conversions: what is written is what the reader gets back, and nothing non-finite lands."""

from __future__ import annotations

import pytest
import torch

from saeworks.activations.store import StoreError, to_storable, to_tensor


@pytest.mark.parametrize("store_dtype", ["float16", "float32", "bfloat16"])
def test_conversion_round_trips_in_the_stored_dtype(store_dtype: str) -> None:
    activations = torch.randn(5, 7) * 100
    restored = to_tensor(to_storable(activations, store_dtype, "h"), store_dtype)
    assert restored.dtype == getattr(torch, store_dtype)
    assert torch.equal(restored, activations.to(restored.dtype))


def test_float16_overflow_is_refused_with_the_fix() -> None:
    activations = torch.tensor([[1.0, 70_000.0]])
    with pytest.raises(StoreError, match=r"blocks\.0\.hook_resid_post are not finite in float16.*bfloat16"):
        to_storable(activations, "float16", "blocks.0.hook_resid_post")
    assert to_storable(activations, "bfloat16", "h").shape == (1, 2)  # bfloat16 has the range


def test_nan_from_the_model_is_refused_in_every_dtype() -> None:
    for store_dtype in ("float16", "float32", "bfloat16"):
        with pytest.raises(StoreError, match="not finite"):
            to_storable(torch.tensor([[float("nan")]]), store_dtype, "h")
