"""Which token positions an intervention touches, in a plain forward and in cached generation.

A hook sees only the activations of the tokens in the current forward: the whole (left-padded)
prompt first, then one new token per step when `generate` runs with a KV cache. `PositionTracker`
is a forward pre-hook on the model itself that records, for the forward in flight, every token's
real position (its index counted from the first non-padding token, BOS = 0) and whether it was
generated, so an intervention means the same positions in both cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeworks.sae.errors import SaeworksError


class PositionError(SaeworksError, ValueError):
    """A position selection that cannot be understood."""


@dataclass(frozen=True)
class ForwardPositions:
    """Where the tokens of one forward sit in their sequences."""

    positions: torch.Tensor
    """[batch, T] int64: real position of each token (BOS = 0); -1 for left padding."""
    generated: torch.Tensor
    """[batch, T] bool: the token was generated (it follows the prompt of its sequence)."""
    prompt_lengths: torch.Tensor
    """[batch] int64: real length of each row's prompt (its non-padding tokens)."""


class PositionTracker:
    """Records `ForwardPositions` for every forward of `model` while attached (`attach`)."""

    def __init__(self, prompt_lengths: Sequence[int] | int | None = None) -> None:
        self.current: ForwardPositions | None = None
        self._fixed = None if prompt_lengths is None else torch.as_tensor(prompt_lengths).reshape(-1)
        """Given prompt lengths (scoring a finished sequence as if it had been generated), else
        each sequence's first forward is its prompt."""
        self._prompt_lengths: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> Any:
        """Register on the model; returns the handle to remove."""
        return model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, width = int(tokens.shape[0]), int(tokens.shape[1])
        device = tokens.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            mask = mask.to(device).bool()
            offset = int(mask.shape[1]) - width  # tokens already in the cache
            real = mask.long().cumsum(dim=1) - 1  # [batch, cached + T]
            positions = real[:, offset:].masked_fill(~mask[:, offset:], -1)
        else:
            offset = _cached_length(kwargs)
            positions = torch.arange(offset, offset + width, device=device).expand(batch, width)
        if self._fixed is not None:
            self._prompt_lengths = self._fixed.to(device).expand(batch)
        elif offset == 0 or self._prompt_lengths is None or self._prompt_lengths.shape[0] != batch:
            self._prompt_lengths = (positions >= 0).sum(dim=1)  # a new sequence starts: its prompt
        generated = positions >= self._prompt_lengths.unsqueeze(1)
        self.current = ForwardPositions(positions, generated, self._prompt_lengths)


def _cached_length(kwargs: dict) -> int:
    """Tokens already in the KV cache when no attention mask tells (0 for a plain forward)."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        return int(position_ids.reshape(-1)[0])
    return 0


@dataclass(frozen=True)
class Positions:
    """Which positions to edit.

    `kept` (the default): every position from the SAE's first kept position on (its
    seqpos_slice start), so BOS and the attention sinks stay untouched, as in evaluation.
    `explicit`: the listed real positions (BOS = 0; a negative one counts back from the end of
    the prompt, -1 being its last token). `generated`: only tokens generated after the prompt.
    """

    kind: str = "kept"
    explicit: tuple[int, ...] = ()

    KINDS = ("kept", "explicit", "generated")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise PositionError(f"positions {self.kind!r}: choose one of {', '.join(self.KINDS)} "
                                "(or give a list of positions)")
        if self.kind == "explicit" and not self.explicit:
            raise PositionError("explicit positions: give at least one position")

    @classmethod
    def at(cls, positions: Sequence[int]) -> Positions:
        return cls("explicit", tuple(int(p) for p in positions))

    @classmethod
    def parse(cls, text: str | Sequence[int] | Positions | None) -> Positions:
        """`None`/"kept", "generated", "3,4,-1" or a list of ints."""
        if text is None:
            return cls()
        if isinstance(text, Positions):
            return text
        if not isinstance(text, str):
            return cls.at(text)
        if text in cls.KINDS and text != "explicit":
            return cls(text)
        try:
            return cls.at([int(p) for p in text.split(",") if p.strip()])
        except ValueError:
            raise PositionError(f"positions {text!r}: give kept, generated, or comma-separated "
                                "integers such as 3,4,-1") from None

    def mask(self, where: ForwardPositions, first_kept: int) -> torch.Tensor:
        """[batch, T] bool: the tokens of this forward to edit."""
        real = where.positions >= 0
        if self.kind == "kept":
            return real & (where.positions >= first_kept)
        if self.kind == "generated":
            return real & where.generated
        chosen = torch.zeros_like(real)
        for p in self.explicit:
            target = where.prompt_lengths.unsqueeze(1) + p if p < 0 else torch.full_like(
                where.prompt_lengths.unsqueeze(1), p)
            chosen |= where.positions == target
        return real & chosen
