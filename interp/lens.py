"""Logit lens: every layer's residual stream read out as next-token predictions (nostalgebraist 2020).

Layer "embed" is the residual stream entering block 0 (`blocks.0.hook_resid_pre`: the embeddings, as
the model scales them); layer "L" is block L's output (`blocks.L.hook_resid_post`). Each is read out
through the final norm with its *own* statistics (the standard lens, not the frozen scale of
attribution), the unembedding and the softcap (`Readout.logits`), so the last layer's readout is the
model's own logits. Ranks are 1-based (rank 1: the top token).

    lens = logit_lens(model, "The capital of France is", tokenizer=tokenizer, target=" Paris")
    print(lens.table())                  # per layer at the last position: top tokens, target's rank
    Path("lens.png").write_bytes(lens.png())
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from saeworks.activations.hooks import blocks_of
from saeworks.eval.dictionary import FeatureDictionary
from saeworks.interp.readout import (
    Readout,
    check_position,
    clean_run,
    prompt_token_ids,
    token_id,
    token_text,
)

EMBED = "embed"
"""Layer name of the residual stream before block 0."""


def lens_hooks(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, hook name) of every residual stream the lens reads, embeddings first."""
    n_layers = len(blocks_of(model))
    posts = [(str(i), f"blocks.{i}.hook_resid_post") for i in range(n_layers)]
    return [(EMBED, "blocks.0.hook_resid_pre"), *posts]


@torch.no_grad()
def lens_logits(model: nn.Module, input_ids: torch.Tensor | Sequence[int],
                readout: Readout | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(layer name, [pos, vocab] float32 logits) of each layer's residual stream, one at a time."""
    readout = readout or Readout.of(model)
    hooks = lens_hooks(model)
    run = clean_run(model, input_ids, [hook for _, hook in hooks])
    for layer, hook in hooks:
        yield layer, readout.logits(run.activations[hook])


@dataclass(frozen=True)
class LogitLens:
    """A prompt's logit lens: top tokens (and a target's rank and probability) per layer and position."""

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    """[pos] each prompt token's text."""
    layers: list[str]
    top_ids: torch.Tensor
    """[layers, pos, k] int64: the top-k next tokens."""
    top_probs: torch.Tensor
    """[layers, pos, k] float32: their probabilities."""
    top_texts: list[list[list[str]]]
    """[layers][pos][k] their texts."""
    target: int | None = None
    target_text: str | None = None
    target_rank: torch.Tensor | None = None
    """[layers, pos] int64: the target's rank, 1 = top."""
    target_prob: torch.Tensor | None = None
    """[layers, pos] float32."""

    def first_top_layer(self, position: int = -1, token: int | None = None) -> str | None:
        """The first layer where `token` (default: the target, else the last layer's top token) is
        the top prediction at `position`; None if never."""
        position = check_position(position, len(self.token_ids))
        token = token if token is not None else self.target
        if token is None:
            token = int(self.top_ids[-1, position, 0])
        on_top = (self.top_ids[:, position, 0] == token).nonzero()
        return self.layers[int(on_top[0, 0])] if len(on_top) else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt, "token_ids": self.token_ids, "tokens": self.tokens, "layers": self.layers,
            "top_ids": self.top_ids.tolist(), "top_texts": self.top_texts,
            "top_probs": [[[round(p, 6) for p in pos] for pos in layer] for layer in self.top_probs.tolist()],
            "target": self.target, "target_text": self.target_text,
        }
        if self.target_rank is not None and self.target_prob is not None:
            data["target_rank"] = self.target_rank.tolist()
            data["target_prob"] = [[round(p, 6) for p in layer] for layer in self.target_prob.tolist()]
        return data

    def table(self, position: int = -1) -> str:
        """One line per layer at `position`: top tokens with probabilities, the target's rank and
        probability."""
        position = check_position(position, len(self.token_ids))
        head = (f"logit lens of {self.prompt!r}: next token after {self.tokens[position]!r} (position "
                f"{position})" + (f"; target {self.target_text!r}" if self.target is not None else ""))
        lines = [head, f"{'layer':>6}  {'top tokens (probability)':<64}" +
                 ("    rank   prob" if self.target_rank is not None else "")]
        for i, layer in enumerate(self.layers):
            tops = ""
            probs = self.top_probs[i, position].tolist()
            for text, p in zip(self.top_texts[i][position], probs, strict=True):
                item = f"{text!r} {p:.2f}"
                if tops and len(tops) + 2 + len(item) > 64:
                    break  # whole tokens only
                tops = f"{tops}  {item}" if tops else item
            line = f"{layer:>6}  {tops:<64}"
            if self.target_rank is not None and self.target_prob is not None:
                rank, prob = int(self.target_rank[i, position]), float(self.target_prob[i, position])
                line += f"  {rank:>6}  {prob:.3f}"
            lines.append(line)
        return "\n".join(lines)

    def figure(self) -> Figure:
        """Heatmap layers × positions of the target's probability (else the top token's), each cell
        annotated with its top token."""
        values = (self.target_prob if self.target_prob is not None else self.top_probs[..., 0]).numpy()
        n_layers, n_pos = values.shape
        fig = Figure(figsize=(max(6.0, 0.7 * n_pos + 2.0), max(4.0, 0.3 * n_layers + 1.5)))
        ax = fig.subplots()
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(n_layers):
            for p in range(n_pos):
                ax.text(p, i, _short(self.top_texts[i][p][0], 9), ha="center", va="center", fontsize=6,
                        color="white" if values[i, p] > 0.6 else "black", parse_math=False)
        ax.set_xticks(np.arange(n_pos), [_short(t, 10) for t in self.tokens], rotation=60, ha="right",
                      fontsize=7, parse_math=False)
        ax.set_yticks(np.arange(n_layers), self.layers, fontsize=7)
        ax.set_xlabel("position (input token)")
        ax.set_ylabel("layer (residual stream after it)")
        what = f"P({self.target_text!r})" if self.target is not None else "top token's probability"
        ax.set_title(f"Logit lens: {what}; cells: top token", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure().savefig(buffer, dpi=100, format="png")
        return buffer.getvalue()


def _short(text: str, width: int = 7) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


@torch.no_grad()
def logit_lens(model: nn.Module | FeatureDictionary, prompt: str | Sequence[int] | torch.Tensor, *,
               tokenizer: Any = None, target: str | int | None = None, top_k: int = 5,
               prepend_bos: bool | None = None) -> LogitLens:
    """The logit lens of one prompt. `model` may be a FeatureDictionary (its model and tokenizer, and
    the BOS convention of its store); `prompt` text or token ids (used as given); `target` a single
    token (text or id) whose rank and probability are tracked."""
    if isinstance(model, FeatureDictionary):
        dictionary = model
        model, loaded_tokenizer, _ = dictionary._load_runtime()
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if prepend_bos is None:
            prepend_bos = bool(dictionary.info.get("prepend_bos", True))
    assert isinstance(model, nn.Module)
    readout = Readout.of(model)
    vocab = int(readout.W_U.shape[0])
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    ids = prompt_token_ids(tokenizer, prompt, True if prepend_bos is None else prepend_bos)
    target_id = None if target is None else token_id(tokenizer, target, vocab)
    layers, top_ids, top_probs, ranks, probs = [], [], [], [], []
    for layer, logits in lens_logits(model, ids, readout):  # logits [pos, vocab]
        p = logits.softmax(dim=-1)
        values, indices = p.topk(min(top_k, vocab), dim=-1)  # [pos, k]
        layers.append(layer)
        top_ids.append(indices.cpu())
        top_probs.append(values.cpu())
        if target_id is not None:
            target_logit = logits[:, target_id : target_id + 1]  # [pos, 1]
            ranks.append((logits > target_logit).sum(dim=-1).cpu() + 1)
            probs.append(p[:, target_id].cpu())
    top = torch.stack(top_ids)  # [layers, pos, k]
    texts = {i: token_text(tokenizer, i) for i in {*top.flatten().tolist(), *ids}}
    return LogitLens(
        prompt if isinstance(prompt, str) else " ".join(map(str, ids)), ids, [texts[i] for i in ids], layers,
        top, torch.stack(top_probs), [[[texts[i] for i in pos] for pos in layer] for layer in top.tolist()],
        target_id, None if target_id is None else token_text(tokenizer, target_id),
        torch.stack(ranks) if ranks else None, torch.stack(probs) if probs else None)
