"""Generation with and without interventions: default and steered completions side by side.

The decoding loop is written out (KV cache, left padding, per-row random streams) rather than
delegated to `model.generate`, for two guarantees a steering comparison needs:

- each row samples from its own `torch.Generator` seeded with `seed`, so a prompt gets the same
  completion alone or in a batch of prompts of other lengths, and default and steered runs draw
  the same random numbers;
- token for token the same output as `torch.manual_seed(seed); model.generate(...)` for one
  prompt with the same settings: the temperature and top-k/top-p warpers are transformers' own,
  applied in its order, and sampling is the same `torch.multinomial` call.

Log-probabilities are those of the model's own next-token distribution (log-softmax of the
logits, before the frequency penalty, temperature and top-p), for the chosen token and the top
alternatives.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from saeworks.activations.text import separator_ids
from saeworks.steer.interventions import Intervention, intervene
from saeworks.steer.settings import GenerationError, GenerationSettings


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the most likely alternatives."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, int, float]] = field(default_factory=list)
    """(token, id, log-probability) of the `n_logprobs` most likely tokens, most likely first."""


@dataclass(frozen=True)
class Completion:
    """A prompt's continuation."""

    prompt: str
    prompt_ids: list[int]
    """What the model read (BOS first when the SAE's training prepended it)."""
    token_ids: list[int]
    """The generated tokens (ending with EOS when the model ended the text)."""
    text: str
    """The generated tokens decoded (special tokens dropped)."""
    logprobs: list[TokenLogprob]

    @property
    def mean_logprob(self) -> float:
        return sum(t.logprob for t in self.logprobs) / max(len(self.logprobs), 1)


@dataclass(frozen=True)
class SideBySide:
    """Default and steered completions of one prompt with the same seed and settings."""

    prompt: str
    default: Completion
    steered: Completion


StepLogprobs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One generated token's (log-probability, top ids [n], top log-probabilities [n])."""


def prompt_ids(tokenizer: Any, prompt: str, prepend_bos: bool) -> list[int]:
    """The prompt's token ids as the harvester made windows: BOS first when it prepended one."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return [separator_ids(tokenizer)[0], *ids] if prepend_bos else ids


def check_length(model: nn.Module, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse a prompt that does not fit the model's context with its completion."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        return
    if n_prompt > limit:
        raise GenerationError(f"the prompt is {n_prompt} tokens and the model reads at most {limit}; "
                              "shorten it (prompts are never truncated silently)")
    if n_prompt + max_new_tokens > limit:
        raise GenerationError(f"the prompt ({n_prompt} tokens) and max_new_tokens={max_new_tokens} exceed "
                              f"the model's {limit} positions; ask for at most {limit - n_prompt} new tokens")


def generate(model: nn.Module, tokenizer: Any, prompts: str | Sequence[str],
             interventions: Sequence[Intervention] = (), settings: GenerationSettings | None = None,
             *, prepend_bos: bool = True) -> list[Completion]:
    """Complete each prompt (a batch, left-padded) with `interventions` applied to every forward."""
    settings = settings or GenerationSettings()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise GenerationError("no prompts given")
    rows = [prompt_ids(tokenizer, text, prepend_bos) for text in texts]
    for row in rows:
        if not row:
            raise GenerationError("an empty prompt with no BOS gives the model nothing to continue")
        check_length(model, len(row), settings.max_new_tokens)
    with intervene(model, interventions):
        generated, logprobs = decode(model, rows, settings, _pad_id(tokenizer), _eos_ids(model, tokenizer))
    return [_completion(tokenizer, text, row, ids, lps, settings.n_logprobs)
            for text, row, ids, lps in zip(texts, rows, generated, logprobs, strict=True)]


def side_by_side(model: nn.Module, tokenizer: Any, prompts: str | Sequence[str],
                 interventions: Sequence[Intervention], settings: GenerationSettings | None = None,
                 *, prepend_bos: bool = True) -> list[SideBySide]:
    """Default and steered completions of each prompt, same seed and settings."""
    default = generate(model, tokenizer, prompts, (), settings, prepend_bos=prepend_bos)
    steered = generate(model, tokenizer, prompts, interventions, settings, prepend_bos=prepend_bos)
    return [SideBySide(d.prompt, d, s) for d, s in zip(default, steered, strict=True)]


@torch.no_grad()
def decode(model: nn.Module, rows: list[list[int]], settings: GenerationSettings, pad_id: int,
           eos_ids: set[int]) -> tuple[list[list[int]], list[list[StepLogprobs]]]:
    """Sample continuations of `rows` (token ids, unpadded). Returns per row the generated ids and,
    per generated token, (its log-probability, top ids, top log-probabilities)."""
    device = next(model.parameters()).device
    batch, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, device=device)
        attention[i, width - len(row):] = 1
    generators = [torch.Generator(device=device).manual_seed(settings.seed) for _ in rows]
    warpers = _warpers(settings)
    counts: torch.Tensor | None = None  # [batch, vocab] occurrences, for the frequency penalty
    parameters = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    # Only the last position's logits are read: skip the LM head over the prompt, as generate does.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    cache: Any = None
    step_ids, sequence = input_ids, input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    out_ids: list[list[int]] = [[] for _ in rows]
    out_lps: list[list[StepLogprobs]] = [[] for _ in rows]
    for _ in range(settings.max_new_tokens):
        positions = (attention.cumsum(dim=1) - 1).masked_fill(attention == 0, 1)[:, -step_ids.shape[1]:]
        output = model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                       use_cache=True, **{cache_name: cache}, **last_only)
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        logits = output.logits[:, -1, :].float()  # [batch, vocab]
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = logits
        if settings.frequency_penalty:
            if counts is None:
                counts = torch.zeros_like(logits)
                counts.scatter_add_(1, input_ids, attention.to(logits.dtype))
            scores = scores - settings.frequency_penalty * counts
        for warper in warpers:
            scores = warper(sequence, scores)
        if settings.greedy:
            chosen = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1)
            chosen = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=generators[i]).view(1)
                                for i in range(batch)])
        chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        top_lp, top_ids = logprobs.topk(settings.n_logprobs, dim=-1) if settings.n_logprobs else (
            logprobs[:, :0], chosen[:, None][:, :0])
        chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
        for i in range(batch):
            if not finished[i]:
                out_ids[i].append(int(chosen[i]))
                out_lps[i].append((chosen_lp[i], top_ids[i], top_lp[i]))
        if counts is not None:
            counts.scatter_add_(1, chosen[:, None], (~finished).to(counts.dtype)[:, None])
        if settings.stop_at_eos and eos_ids:
            finished |= torch.isin(chosen, eos)
        step_ids = chosen[:, None]
        sequence = torch.cat([sequence, step_ids], dim=1)
        attention = torch.cat([attention, torch.ones_like(step_ids)], dim=1)
        if bool(finished.all()):
            break
    return out_ids, out_lps


def _warpers(settings: GenerationSettings) -> list[Any]:
    """transformers' own warpers, in the order `generate` applies them."""
    if settings.greedy:
        return []
    warpers: list[Any] = []
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else separator_ids(tokenizer)[1])


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for eos in (tokenizer.eos_token_id, config_eos):
        if isinstance(eos, int):
            found.add(eos)
        elif isinstance(eos, (list, tuple)):
            found.update(int(e) for e in eos)
    return found


def _completion(tokenizer: Any, prompt: str, row: list[int], ids: list[int],
                logprobs: list[StepLogprobs], n_top: int) -> Completion:
    top_ids = sorted({int(t) for _, tops, _ in logprobs for t in tops.tolist()} | set(ids))
    texts = dict(zip(top_ids, tokenizer.batch_decode([[t] for t in top_ids], skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False), strict=True))
    entries = [TokenLogprob(texts[t], t, float(lp),
                            [(texts[int(j)], int(j), float(v)) for j, v in zip(tops.tolist(), values.tolist(),
                                                                               strict=True)][:n_top])
               for t, (lp, tops, values) in zip(ids, logprobs, strict=True)]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Completion(prompt, row, ids, text, entries)


def render_side_by_side(result: SideBySide, width: int = 100) -> str:
    """The prompt, then default and steered completions in two columns of `width` characters."""
    column = max(20, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.split("\n"):
            lines += textwrap.wrap(paragraph, column, replace_whitespace=False, drop_whitespace=False) or [""]
        return lines

    left, right = ["DEFAULT", *wrap(result.default.text)], ["STEERED", *wrap(result.steered.text)]
    left.insert(1, "-" * column)
    right.insert(1, "-" * column)
    rows = [f"{a:<{column}} | {b}".rstrip() for a, b in
            zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right)), strict=True)]
    means = (f"{'mean logprob ' + format(result.default.mean_logprob, '.3f'):<{column}} | "
             f"mean logprob {result.steered.mean_logprob:.3f}")
    return "\n".join([f"prompt: {result.prompt!r}", *rows, means])
