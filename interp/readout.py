"""The model's final norm and unembedding as a readout of the residual stream, standard or frozen.

Two readouts of a residual-stream vector r (float32 results):

- standard (`Readout.logits`): r through the model's own final-norm module, with r's own statistics,
  then the unembedding, its bias and the family's final-logit softcap: exactly what the model does to
  its last residual stream (the logit lens applies it to every layer's);
- frozen (`Readout.freeze` → `FrozenNorm`): the norm's per-position scale is taken from a clean run's
  final residual stream and held fixed, so the norm becomes a linear map (plus its bias) and any split
  of the final residual stream into components pushes through it additively: the components'
  readouts sum exactly to the clean run's normalised output (direct logit attribution).

Norms supported (every family of `activations.hooks.ARCHITECTURES`, checked against the module's own
output on each clean run): RMSNorm, y = γ ⊙ x / sqrt(mean(x²) + eps), with γ = w (Llama, Mistral,
Qwen 2/3) or γ = 1 + w (Gemma 1/2/3); LayerNorm, y = γ ⊙ (x − mean(x)) / sqrt(var(x) + eps) + β (GPT-2,
GPT-NeoX). LayerNorm's centring is itself linear, so it is applied to each component (as TransformerLens
centres the weights that write to the residual stream); only the scale 1/σ needs freezing.
Logits: the output embedding's weight and bias (when it has one), then Gemma 2/3's
`final_logit_softcapping`, cap · tanh(z / cap), when the config sets it. The softcap is not additive,
so attribution decomposes the logit *before* it (`Readout.unembed_linear`). Other logit transforms
(e.g. Cohere's logit_scale) belong to families outside ARCHITECTURES and are not handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeworks.activations.hooks import architecture_of, hooks_attached
from saeworks.sae.errors import SaeworksError
from saeworks.steer.generate import prompt_ids as _prompt_ids

_UNIT_OFFSET_GAIN = ("gemma", "gemma2", "gemma3_text")
"""Families whose RMSNorm multiplies by (1 + w), not w."""


class InterpError(SaeworksError, ValueError):
    """An attribution, lens or patching request that cannot be answered as asked."""


def final_norm_of(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding (on the causal LM or on its base model)."""
    path = architecture_of(model).final_norm
    for candidate in (path, path.split(".", 1)[1]):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise InterpError(f"cannot find the final norm at {path!r} in {type(model).__name__}")


@dataclass(frozen=True)
class FrozenNorm:
    """The final norm with its per-position scale frozen from a clean run: a linear map of the
    residual stream (`__call__`) plus a constant (`bias`, LayerNorm's β)."""

    gain: torch.Tensor
    """[d] float32: γ (Gemma: 1 + w)."""
    scale: torch.Tensor
    """[pos, 1] float32: 1/σ of the clean run's final residual stream at each position."""
    centred: bool
    """LayerNorm: each component is centred (a linear map) before scaling."""
    bias: torch.Tensor | None
    """[d] float32: LayerNorm's β, the same at every position (None for RMSNorm)."""

    def __call__(self, component: torch.Tensor) -> torch.Tensor:
        """[..., pos, d] -> [..., pos, d] float32: the component's share of the normalised output."""
        component = component.float()
        if self.centred:
            component = component - component.mean(dim=-1, keepdim=True)
        return component * self.scale * self.gain

    def functional(self, direction: torch.Tensor, position: int) -> torch.Tensor:
        """[d] -> [d] w such that `frozen(c)[position] · direction == c[position] · w` for any c:
        a direction read in normalised space (e.g. W_U[target]) pulled back onto the residual."""
        w = self.scale[position, 0] * self.gain * direction.float()  # [d]
        return w - w.mean() if self.centred else w  # centring is a symmetric projection

    def constant(self, direction: torch.Tensor) -> float:
        """β · direction: the norm bias's part of a readout (0 for RMSNorm)."""
        return 0.0 if self.bias is None else float(self.bias @ direction.float())


@dataclass(frozen=True)
class Readout:
    """A causal LM's final norm and unembedding; weights as float32 copies (views when float32)."""

    norm: nn.Module
    unembed: nn.Module
    layer_norm: bool
    """LayerNorm (centres and has a bias) rather than RMSNorm."""
    gain: torch.Tensor
    """[d] γ (Gemma: 1 + w)."""
    norm_bias: torch.Tensor | None
    """[d] β (LayerNorm with a bias), else None."""
    eps: float
    W_U: torch.Tensor
    """[vocab, d] the unembedding."""
    b_U: torch.Tensor | None
    """[vocab] its bias, when it has one."""
    softcap: float | None
    """Final-logit softcap (Gemma 2/3), applied after the unembedding."""

    @classmethod
    def of(cls, model: nn.Module) -> Readout:
        """The readout of a causal LM of any family in ARCHITECTURES."""
        norm, unembed = final_norm_of(model), model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(getattr(unembed, "weight", None), torch.Tensor):
            raise InterpError(f"{type(model).__name__} has no unembedding (output embeddings); load the "
                              "model as a causal LM (AutoModelForCausalLM)")
        model_type = model.config.model_type  # type: ignore[union-attr]
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        d = int(unembed.weight.shape[1])
        gain = torch.ones(d) if weight is None else weight.detach().float()
        if model_type in _UNIT_OFFSET_GAIN:
            gain = 1.0 + gain
        layer_norm = isinstance(norm, nn.LayerNorm)
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
        if eps is None:
            raise InterpError(f"final norm {type(norm).__name__} of {model_type} has no eps; unsupported")
        b_U = getattr(unembed, "bias", None)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return cls(norm, unembed, layer_norm, gain.to(unembed.weight.device),
                   bias.detach().float() if layer_norm and bias is not None else None, float(eps),
                   unembed.weight.detach().float(), None if b_U is None else b_U.detach().float(),
                   float(cap) if cap else None)

    @torch.no_grad()
    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., vocab] float32: the standard readout (the model's own final norm with the
        input's own statistics, the unembedding and the softcap), as the model computes its logits."""
        normed = self.norm(resid.to(next(self.unembed.parameters()).dtype))
        logits = self.unembed(normed).float()  # [..., vocab]
        return self.apply_softcap(logits)

    def apply_softcap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def unembed_linear(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., d] normalised -> [..., vocab] float32 logits before the softcap (additive in `normed`
        up to the bias)."""
        logits = normed.float() @ self.W_U.T
        return logits if self.b_U is None else logits + self.b_U

    def direction(self, target: int, contrast: int | None = None) -> torch.Tensor:
        """[d] the unembedding direction of logit[target] (minus logit[contrast])."""
        return self.W_U[target] if contrast is None else self.W_U[target] - self.W_U[contrast]

    def bias_term(self, target: int, contrast: int | None = None) -> float | None:
        """The unembedding bias's part of logit[target] (− logit[contrast]); None without a bias."""
        if self.b_U is None:
            return None
        return float(self.b_U[target] - (0.0 if contrast is None else self.b_U[contrast]))

    @torch.no_grad()
    def statistics(self, resid: torch.Tensor) -> torch.Tensor:
        """[pos, d] -> [pos, 1] float32: 1/σ, the norm's scale for each position of `resid`."""
        resid = resid.float()
        if self.layer_norm:
            spread = resid.var(dim=-1, keepdim=True, unbiased=False)
        else:
            spread = resid.pow(2).mean(dim=-1, keepdim=True)
        return torch.rsqrt(spread + self.eps)

    @torch.no_grad()
    def freeze(self, final_resid: torch.Tensor, normed: torch.Tensor | None = None) -> FrozenNorm:
        """The norm frozen at the scale of a clean run's final residual stream `[pos, d]`; `normed`,
        the norm's output on that run, checks that this family's norm is the one modelled here."""
        frozen = FrozenNorm(self.gain, self.statistics(final_resid), self.layer_norm, self.norm_bias)
        if normed is not None:
            mine = frozen(final_resid) + (0.0 if self.norm_bias is None else self.norm_bias)
            theirs = normed.float()
            tolerance = 1e-4 if normed.dtype == final_resid.dtype == torch.float32 else 3e-2
            if not torch.allclose(mine, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max())):
                raise InterpError(f"the final norm {type(self.norm).__name__} does not compute RMSNorm or "
                                  "LayerNorm as modelled in interp/readout.py; it cannot be frozen")
        return frozen


@dataclass(frozen=True)
class CleanRun:
    """One prompt's forward pass, with what attribution and the lens read from it."""

    input_ids: torch.Tensor
    """[pos] int64."""
    activations: dict[str, torch.Tensor]
    """hook name -> [pos, d] as the model computed it (its dtype)."""
    final_resid: torch.Tensor
    """[pos, d] the final norm's input: the last residual stream."""
    normed: torch.Tensor
    """[pos, d] the final norm's output."""
    logits: torch.Tensor
    """[pos, vocab] float32: the unembedding's output, before any softcap."""


@torch.no_grad()
def clean_run(model: nn.Module, input_ids: torch.Tensor | Sequence[int],
              hooks: Sequence[str] = ()) -> CleanRun:
    """Run one prompt (`[pos]` ids) and record the named hooks, the final norm's input and output,
    and the unembedding's output."""
    device = model.get_output_embeddings().weight.device  # type: ignore[operator]
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(-1)  # [pos]
    seen: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Any:
        def record(activation: torch.Tensor) -> None:
            seen[name] = activation[0].detach()

        return record

    def at_norm(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        seen["final_resid"] = (args[0] if args else next(iter(kwargs.values())))[0].detach()
        seen["normed"] = output[0].detach()

    def at_unembed(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["logits"] = output[0].detach().float()

    norm_handle = final_norm_of(model).register_forward_hook(at_norm, with_kwargs=True)
    unembed_handle = model.get_output_embeddings().register_forward_hook(at_unembed)  # type: ignore[operator]
    try:
        with hooks_attached(model, {name: recorder(name) for name in hooks}):
            model(input_ids=ids[None], use_cache=False)
    finally:
        norm_handle.remove()
        unembed_handle.remove()
    return CleanRun(ids, {name: seen[name] for name in hooks}, seen["final_resid"], seen["normed"],
                    seen["logits"])


def prompt_token_ids(tokenizer: Any, prompt: str | Sequence[int] | torch.Tensor,
                     prepend_bos: bool = True) -> list[int]:
    """A prompt's ids as the harvester made windows (BOS first when `prepend_bos`); ids pass as given."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InterpError("a text prompt needs a tokenizer; pass tokenizer=... or give token ids")
        ids = _prompt_ids(tokenizer, prompt, prepend_bos)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise InterpError("the prompt is empty; give at least one token")
    return ids


def check_position(position: int, n_tokens: int) -> int:
    """`position` as an index 0..n_tokens-1 (negative counts from the end), or a one-line error."""
    if not -n_tokens <= position < n_tokens:
        raise InterpError(f"position {position} is out of range: the prompt is {n_tokens} tokens (BOS "
                          f"included when prepended); use 0..{n_tokens - 1} or -{n_tokens}..-1")
    return position % n_tokens


def token_id(tokenizer: Any, token: str | int, vocab_size: int, what: str = "target") -> int:
    """The id of a single token given as text or id; text that is not one token is refused with how
    it tokenises (and the leading-space form when that one is a single token)."""
    if isinstance(token, int):
        if not 0 <= token < vocab_size:
            raise InterpError(f"{what} token id {token} is out of range: the vocabulary has ids "
                              f"0..{vocab_size - 1}")
        return token
    if tokenizer is None:
        raise InterpError(f"{what} {token!r} is text and no tokenizer was given; pass tokenizer=... "
                          "or a token id")
    ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
    if len(ids) == 1:
        return int(ids[0])
    pieces = [token_text(tokenizer, i) for i in ids]
    hint = "give a single token"
    spaced = " " + token.lstrip()
    if spaced != token and len(tokenizer(spaced, add_special_tokens=False)["input_ids"]) == 1:
        hint += f", e.g. {spaced!r} with its leading space (how a word reads after another word)"
    elif pieces:
        hint += f", e.g. its first token {pieces[0]!r}"
    raise InterpError(f"{what} {token!r} is {len(ids)} tokens {pieces}; {hint}")


def token_text(tokenizer: Any, token: int) -> str:
    """One token's text as it reads in context (no cleanup), or `#id` without a tokenizer."""
    if tokenizer is None:
        return f"#{token}"
    return str(tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False))
