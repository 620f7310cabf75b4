"""AxBench-style evaluation of steering with one feature: does the steered model write about the
feature's concept, and what does that cost in fluency? Compared with two baselines.

For each coefficient, every prompt is continued with the feature steered (`FeatureIntervention`,
the chosen direction method, default positions), and the continuations are scored by the CLEAN
model, which re-reads prompt + generated tokens with no intervention:

- concept: the feature's activation on the generated tokens (the hook captured in that forward,
  encoded by the dictionary's SAE): the fraction of generated tokens where it fires (> 0), and its
  mean activation, raw and as a fraction of its maximum activation in the dictionary;
- fluency: the mean next-token loss (NLL, nats) of the generated tokens given the prompt, and its
  ratio to that of the unsteered continuations (same prompts, settings and seed).

Scores pool every generated token of every prompt (a trailing end-of-text token is not scored):

    concept score C = fire fraction                              in [0, 1]
    fluency score F = min(1, unsteered loss / loss)              in [0, 1]
    combined        = 2·C·F / (C + F), the harmonic mean; 0 when C or F is 0

The best coefficient is the feature's coefficient with the highest combined score (ties: the
smaller coefficient). Variants, all on the same prompts and generation settings:

- `unsteered`: no intervention (the fluency reference);
- `feature`: the feature at each coefficient (additive c: h ← h + c·max_act·W_dec[f]);
- `diffmean`: the DiffMean direction at the same hook, the mean activation over store rows where
  the feature fires minus the mean over rows where it does not (the rows the analysis reads:
  positions from the later of the store's `first_positions` and the SAE's first kept position,
  special tokens skipped), rescaled to the norm of the feature's additive vector at coefficient 1,
  max_act·‖W_dec[f]‖, so the same coefficients mean the same push. Skipped, with the reason,
  when no store can be opened or the feature never (or always) fires in the rows read;
- `prompt`: no steering; the concept is asked for in words before each prompt
  (`prompt_template`), and the continuation is scored conditioned on the ORIGINAL prompt (no
  prefix), so its scores compare with the others'. The concept is the feature's user label, else
  its most frequent activating tokens (an automatic label, `' a' ' b' → ' c'`, is no text to ask
  for), else its label.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from saeworks.activations.hooks import hooks_attached
from saeworks.activations.rows import RowSelection, iter_kept_rows
from saeworks.activations.store import ActivationStore
from saeworks.eval.dictionary import Feature, FeatureDictionary
from saeworks.sae.atomic import write_bytes_atomic, write_text_atomic
from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.errors import SaeworksError
from saeworks.steer.generate import Completion, GenerationSettings, generate, prompt_ids
from saeworks.steer.interventions import (
    DIRECTION_METHODS,
    FeatureIntervention,
    FeatureSource,
    Intervention,
    VectorIntervention,
)
from saeworks.steer.prompts import BUILTIN_PROMPTS, check_prompts

FORMAT = "saeworks-steer-eval"
FORMAT_VERSION = 1
JSON_FILE = "steer_eval.json"
PLOT_FILE = "steer_eval.png"
VARIANTS = ("unsteered", "feature", "diffmean", "prompt")
"""Row variants, in table order."""
STEERED = ("feature", "diffmean")
"""Variants with a coefficient."""
FORMULA = {
    "pooling": "over every generated token of every prompt (a trailing end-of-text token is not scored)",
    "concept_score": "C = fraction of generated tokens where the feature fires (activation > 0), in [0, 1]",
    "fluency_score": "F = min(1, unsteered loss / loss), loss = clean model's mean NLL (nats) of the "
                     "generated tokens given the prompt, in [0, 1]",
    "combined": "2*C*F / (C + F) (harmonic mean); 0 when C or F is 0",
    "best": "the feature's coefficient with the highest combined score (ties: the smaller coefficient)",
}
"""The scoring formula, as written into the JSON."""
DEFAULT_TEMPLATE = 'Write about "{concept}".\n\n{prompt}'


class SteerEvalError(SaeworksError, ValueError):
    """A steering evaluation that cannot run as asked (settings, feature, prompts)."""


def parse_coefficients(text: str) -> tuple[float, ...]:
    """Coefficients from a comma-separated list such as "0,1,2,4,8" (as a command line gives them)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise SteerEvalError(f"coefficients {text!r}: give comma-separated numbers such as "
                             "0,1,2,4,8") from None
    if not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
        raise SteerEvalError(f"coefficients {text!r}: give distinct finite numbers such as 0,1,2,4,8")
    return values


@dataclass(frozen=True)
class SteerEvalSettings:
    """How to run a steering evaluation (see the module docstring for what is measured)."""

    coefficients: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    """Steering strengths, in the method's units (additive: multiples of the feature's max activation)."""
    prompts: tuple[str, ...] | None = None
    """Prompts to continue; None: the built-in neutral set (`saeworks.steer.prompts.BUILTIN_PROMPTS`)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt (fewer when the model ends the text)."""
    temperature: float = 0.7
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 0.9
    """Nucleus sampling threshold (1: off)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per earlier occurrence (0: off)."""
    seed: int = 0
    """Seed of every row's random stream: every variant draws the same random numbers."""
    method: str = "additive"
    """Steering method, one of the direction methods: additive, projection_cap, orthogonal."""
    batch_size: int = 16
    """Prompts generated and scored at once."""
    diffmean_rows: int = 65_536
    """Most store rows read to compute the DiffMean direction (0: skip that baseline)."""
    prompt_template: str = DEFAULT_TEMPLATE
    """The prompt baseline's input; `{concept}` and `{prompt}` are replaced."""
    n_examples: int = 2
    """Example completions kept per row (those of the first prompts)."""

    def __post_init__(self) -> None:
        problems = []
        coefficients = tuple(self.coefficients)
        if not coefficients:
            problems.append("coefficients is empty (give at least one, e.g. 0,1,2,4,8)")
        elif not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coefficients):
            problems.append(f"coefficients {list(coefficients)} (each must be a finite number)")
        elif len(set(coefficients)) != len(coefficients):
            problems.append(f"coefficients {list(coefficients)} repeat a value")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} (must be >= 1)")
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature} (must be >= 0; 0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if not math.isfinite(self.frequency_penalty):
            problems.append(f"frequency_penalty={self.frequency_penalty} (must be finite)")
        if self.method not in DIRECTION_METHODS:
            problems.append(f"method={self.method!r} (choose one of {', '.join(DIRECTION_METHODS)})")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (must be >= 1)")
        if self.diffmean_rows < 0:
            problems.append(f"diffmean_rows={self.diffmean_rows} (must be >= 0; 0 skips DiffMean)")
        if "{concept}" not in self.prompt_template or "{prompt}" not in self.prompt_template:
            problems.append(f"prompt_template={self.prompt_template!r} (must contain {{concept}} and "
                            "{prompt})")
        if self.n_examples < 0:
            problems.append(f"n_examples={self.n_examples} (must be >= 0)")
        if problems:
            raise SteerEvalError("bad steering evaluation settings: " + "; ".join(problems))
        object.__setattr__(self, "coefficients", tuple(float(c) for c in coefficients))
        if self.prompts is not None:
            object.__setattr__(self, "prompts", check_prompts(self.prompts, "settings.prompts"))

    def generation(self) -> GenerationSettings:
        """The sampling settings shared by every variant."""
        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, frequency_penalty=self.frequency_penalty,
                                  seed=self.seed, n_logprobs=0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "coefficients": list(self.coefficients),
                "prompts": None if self.prompts is None else list(self.prompts)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteerEvalSettings:
        prompts = data.get("prompts")
        return cls(**{**data, "coefficients": tuple(data["coefficients"]),
                      "prompts": None if prompts is None else tuple(prompts)})


@dataclass(frozen=True)
class SteeringRow:
    """The scores of one variant at one coefficient (None: the variant has none)."""

    variant: str
    coefficient: float | None
    n_tokens: int
    """Generated tokens scored, over all prompts."""
    fire_fraction: float
    """Fraction of the scored tokens where the feature fires."""
    mean_activation: float
    """The feature's mean activation over the scored tokens."""
    mean_activation_fraction: float
    """mean_activation / the feature's max activation in the dictionary."""
    loss: float
    """The clean model's mean NLL (nats) of the scored tokens given the original prompt (NaN: none)."""
    loss_ratio: float
    """loss / the unsteered continuations' loss (1 for them)."""
    concept_score: float
    fluency_score: float
    combined: float
    examples: tuple[tuple[str, str], ...] = ()
    """(prompt, completion) of the first prompts."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["examples"] = [{"prompt": p, "completion": c} for p, c in self.examples]
        return {k: _finite_or_none(v) for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteeringRow:
        values: dict[str, Any] = {k: (math.nan if v is None and k != "coefficient" else v)
                                  for k, v in data.items()}
        values["examples"] = tuple((e["prompt"], e["completion"]) for e in data.get("examples", []))
        return cls(**values)


@dataclass(frozen=True)
class DiffMean:
    """The DiffMean direction of a feature over a store's rows."""

    vector: torch.Tensor
    """[d] float32: mean activation over rows where the feature fires minus over rows where it does not."""
    n_rows: int
    """Rows read."""
    n_firing: int
    """Rows where the feature fires."""


@dataclass
class SteeringEvaluation:
    """The result of `evaluate_steering`: one row per variant and coefficient."""

    feature: int
    label: str
    concept: str
    """The text the prompt baseline asks for."""
    max_activation: float
    hook: str
    sae_name: str
    dictionary: str
    settings: SteerEvalSettings
    prompts: tuple[str, ...]
    rows: list[SteeringRow]
    best: float | None
    """The feature's best coefficient (highest combined score)."""
    best_by_variant: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Baselines not run, and why."""
    diffmean: dict[str, Any] = field(default_factory=dict)
    """The DiffMean direction's provenance: store, rows read, rows firing, norms, cosine with W_dec[f]."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per variant and in total."""

    def row(self, variant: str, coefficient: float | None = None) -> SteeringRow:
        """The row of `variant` at `coefficient` (KeyError if there is none)."""
        for r in self.rows:
            if r.variant == variant and r.coefficient == coefficient:
                return r
        raise KeyError(f"no row for {variant} at coefficient {coefficient}")

    def variant_rows(self, variant: str) -> list[SteeringRow]:
        return [r for r in self.rows if r.variant == variant]

    def table(self) -> str:
        """A plain-text table, one line per variant and coefficient."""
        head = (f"feature {self.feature} {self.label}  ({self.sae_name} at {self.hook}, max activation "
                f"{self.max_activation:.4g}, method {self.settings.method})")
        columns = f"{'variant':<10} {'coef':>6} {'tokens':>6} {'fires':>6} {'act/max':>7} {'loss':>6} " \
                  f"{'ratio':>6} {'combined':>8}"
        lines = [head, columns]
        for r in self.rows:
            coef = "-" if r.coefficient is None else f"{r.coefficient:g}"
            lines.append(f"{r.variant:<10} {coef:>6} {r.n_tokens:>6} {r.fire_fraction:>6.3f} "
                         f"{r.mean_activation_fraction:>7.3f} {r.loss:>6.3f} {r.loss_ratio:>6.3f} "
                         f"{r.combined:>8.3f}")
        best = ", ".join(f"{v} {c:g}" for v, c in self.best_by_variant.items())
        lines.append(f"best coefficient: {best or 'none'}  (combined = harmonic mean of fire fraction "
                     "and min(1, unsteered loss / loss))")
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (non-finite numbers as null)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "feature": self.feature, "label": self.label,
            "concept": self.concept, "max_activation": self.max_activation, "hook": self.hook,
            "sae_name": self.sae_name, "dictionary": self.dictionary, "settings": self.settings.to_json(),
            "prompts": list(self.prompts), "formula": FORMULA, "best": self.best,
            "best_by_variant": self.best_by_variant, "skipped": self.skipped,
            "diffmean": {k: _finite_or_none(v) for k, v in self.diffmean.items()},
            "seconds": self.seconds, "rows": [r.to_json() for r in self.rows],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteeringEvaluation:
        if data.get("format") != FORMAT:
            raise SteerEvalError(f"not a steering evaluation (format {data.get('format')!r}, "
                                 f"expected {FORMAT!r})")
        return cls(int(data["feature"]), data["label"], data["concept"], float(data["max_activation"]),
                   data["hook"], data["sae_name"], data["dictionary"],
                   SteerEvalSettings.from_json(data["settings"]), tuple(data["prompts"]),
                   [SteeringRow.from_json(r) for r in data["rows"]], data["best"],
                   dict(data["best_by_variant"]), dict(data["skipped"]), dict(data["diffmean"]),
                   dict(data["seconds"]))

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write steer_eval.json and steer_eval.png into `out_dir` (made if missing), each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = write_text_atomic(out / JSON_FILE, json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        plot = write_bytes_atomic(out / PLOT_FILE, _png(concept_fluency_figure(self)))
        return {"json": data, "plot": plot}


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---- the evaluation ------------------------------------------------------------------------------


def evaluate_steering(dictionary: FeatureDictionary | str | Path, feature: int,
                      settings: SteerEvalSettings | None = None, *, model: nn.Module | None = None,
                      tokenizer: Any = None, store_url: str | None = None,
                      progress: Callable[[str], None] | None = None) -> SteeringEvaluation:
    """Steer with `feature` of `dictionary` at each coefficient and score concept and fluency against
    the unsteered, DiffMean and prompt baselines (module docstring). `model` and `tokenizer` default
    to the dictionary's own; `store_url` (for DiffMean) to the store the dictionary was analysed over;
    `progress` receives one line per stage."""
    settings = settings or SteerEvalSettings()
    if isinstance(dictionary, FeatureDictionary):
        return _Evaluation(dictionary, feature, settings, model, tokenizer, store_url, progress).run()
    with FeatureDictionary.open(dictionary, readonly=True) as opened:
        return _Evaluation(opened, feature, settings, model, tokenizer, store_url, progress).run()


@dataclass
class _Scored:
    """One completion's scored tokens."""

    activations: torch.Tensor
    """[n] float32: the feature's activation on each scored generated token."""
    nll: torch.Tensor
    """[n] float32: the clean model's NLL of each scored generated token."""


class _Evaluation:
    """The state of one evaluation: the model, the feature's source, the prompts and the reference."""

    def __init__(self, dictionary: FeatureDictionary, feature: int, settings: SteerEvalSettings,
                 model: nn.Module | None, tokenizer: Any, store_url: str | None,
                 progress: Callable[[str], None] | None) -> None:
        self.dictionary, self.settings, self.store_url = dictionary, settings, store_url
        self.info: Feature = dictionary.feature(feature)  # FeatureNotFoundError names the size
        self.feature = self.info.id
        if self.info.dead or self.info.max_activation <= 0:
            raise SteerEvalError(f"feature {feature} never fired when {dictionary.path} was analysed (max "
                                 "activation 0): steering with it has no unit and nothing to measure; "
                                 "pick a live feature")
        if model is None or tokenizer is None:
            loaded_model, loaded_tokenizer, _ = dictionary._load_runtime()
            model = loaded_model if model is None else model
            tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
        assert model is not None
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        loaded_sae = dictionary._runtime[2] if dictionary._runtime is not None else None
        self.source = FeatureSource.from_dictionary(dictionary, self.device, sae=loaded_sae)
        self.max_activation = self.source.unit(self.feature)
        self.prompts = settings.prompts or BUILTIN_PROMPTS
        self.generation = settings.generation()
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.progress = progress or (lambda _: None)
        self.reference_loss = math.nan
        self.seconds: dict[str, float] = {}

    @property
    def unit_norm(self) -> float:
        """‖the feature's additive vector at coefficient 1‖ = max_act·‖W_dec[f]‖."""
        return self.max_activation * float(self.source.sae.W_dec[self.feature].detach().float().norm())

    def run(self) -> SteeringEvaluation:
        start = time.perf_counter()
        rows = [self._reference()]
        rows += self._steered("feature", self._feature_interventions)
        skipped: dict[str, str] = {}
        diffmean_info: dict[str, Any] = {}
        direction, reason = self._diffmean(diffmean_info)
        if direction is None:
            skipped["diffmean"] = reason
            self.progress(f"diffmean skipped: {reason}")
        else:
            rows += self._steered("diffmean", lambda c: [self._vector_intervention(direction, c)])
        rows.append(self._prompt_baseline())
        self.seconds["total"] = time.perf_counter() - start
        best_by_variant = {v: best_coefficient([r for r in rows if r.variant == v])
                           for v in STEERED if any(r.variant == v for r in rows)}
        return SteeringEvaluation(
            self.feature, self.info.label, concept_text(self.info), self.max_activation, self.source.hook,
            self.source.name, str(self.dictionary.path), self.settings, tuple(self.prompts), rows,
            best_by_variant.get("feature"), best_by_variant, skipped, diffmean_info, self.seconds)

    # variants

    def _reference(self) -> SteeringRow:
        clock = time.perf_counter()
        completions = self._generate(self.prompts, [])
        scored = self._score(self.prompts, completions)
        self.reference_loss = pooled_loss(scored)
        row = self._row("unsteered", None, completions, scored)
        self._done("unsteered", clock)
        return row

    def _steered(self, variant: str,
                 interventions: Callable[[float], list[Intervention]]) -> list[SteeringRow]:
        rows = []
        clock = time.perf_counter()
        for c in self.settings.coefficients:
            completions = self._generate(self.prompts, interventions(c))
            rows.append(self._row(variant, c, completions, self._score(self.prompts, completions)))
            self.progress(f"{variant} c={c:g}: combined {rows[-1].combined:.3f}")
        self.seconds[variant] = time.perf_counter() - clock
        return rows

    def _prompt_baseline(self) -> SteeringRow:
        clock = time.perf_counter()
        concept = concept_text(self.info)
        asked = [self.settings.prompt_template.replace("{concept}", concept).replace("{prompt}", p)
                 for p in self.prompts]
        completions = self._generate(asked, [])
        # Scored after the original prompt: the prefix is not what the other variants were given.
        row = self._row("prompt", None, completions, self._score(self.prompts, completions))
        self._done("prompt", clock)
        return row

    def _done(self, variant: str, clock: float) -> None:
        self.seconds[variant] = time.perf_counter() - clock
        self.progress(f"{variant}: {self.seconds[variant]:.1f} s")

    def _feature_interventions(self, coefficient: float) -> list[Intervention]:
        return [FeatureIntervention(self.source, self.feature, self.settings.method, coefficient)]

    def _vector_intervention(self, direction: torch.Tensor, coefficient: float) -> Intervention:
        """The DiffMean direction (norm `unit_norm`) with `coefficient` in the feature's units."""
        method = self.settings.method
        # projection_cap caps the projection on the unit direction: the feature's cap is c·unit_norm.
        raw = coefficient * self.unit_norm if method == "projection_cap" else coefficient
        return VectorIntervention(self.source.hook, direction, method, raw, first_kept=self.source.first_kept)

    def _diffmean(self, info: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
        """The rescaled DiffMean direction, or None and why not."""
        if self.settings.diffmean_rows == 0:
            return None, "diffmean_rows=0"
        clock = time.perf_counter()
        store, reason = open_store(self.dictionary, self.store_url)
        if store is None:
            return None, reason
        try:
            selection = diffmean_selection(store, self.source.first_kept, self.settings.diffmean_rows)
            found = diffmean_vector(self.source.sae, store, self.source.hook, self.feature, selection)
        except SaeworksError as err:
            return None, str(err)
        norm = float(found.vector.norm())
        if norm == 0:
            return None, "the DiffMean vector is zero"
        direction = (found.vector * (self.unit_norm / norm)).to(self.device)
        decoder = self.source.sae.W_dec[self.feature].detach().float().cpu()
        info.update({"store": store.url, "rows": found.n_rows, "rows_firing": found.n_firing,
                     "first_position": selection.first_positions, "raw_norm": norm,
                     "scaled_norm": self.unit_norm,
                     "cosine_with_decoder": float(torch.cosine_similarity(found.vector, decoder, dim=0)),
                     "seconds": time.perf_counter() - clock})
        self.progress(f"diffmean direction: {found.n_firing} of {found.n_rows} rows fire, cosine with "
                      f"W_dec {info['cosine_with_decoder']:.3f}")
        return direction, ""

    # generation and scoring

    def _generate(self, prompts: Sequence[str], interventions: list[Intervention]) -> list[Completion]:
        step = self.settings.batch_size
        return [c for i in range(0, len(prompts), step)
                for c in generate(self.model, self.tokenizer, list(prompts[i:i + step]), interventions,
                                  self.generation, prepend_bos=self.source.prepend_bos)]

    def _score(self, prompts: Sequence[str], completions: Sequence[Completion]) -> list[_Scored]:
        contexts = [prompt_ids(self.tokenizer, p, self.source.prepend_bos) for p in prompts]
        continuations = [scored_tokens(c.token_ids, self.special_ids) for c in completions]
        return score_continuations(self.model, self.source.sae, self.source.hook, self.feature, contexts,
                                   continuations, self.settings.batch_size)

    def _row(self, variant: str, coefficient: float | None, completions: Sequence[Completion],
             scored: Sequence[_Scored]) -> SteeringRow:
        examples = tuple((p, c.text) for p, c in zip(self.prompts, completions, strict=True))
        return make_row(variant, coefficient, scored, self.max_activation, self.reference_loss,
                        examples[: self.settings.n_examples])


def scored_tokens(token_ids: Sequence[int], special_ids: set[int]) -> list[int]:
    """The generated tokens that are scored: all but a trailing end-of-text (special) token."""
    ids = list(token_ids)
    while ids and ids[-1] in special_ids:
        ids.pop()
    return ids


@torch.no_grad()
def score_continuations(model: nn.Module, sae: SparseAutoencoder, hook: str, feature: int,
                        contexts: Sequence[list[int]], continuations: Sequence[list[int]],
                        batch_size: int = 16) -> list[_Scored]:
    """For each (context, continuation): the clean model reads context + continuation once; returns
    the feature's activation at `hook` on each continuation token and the NLL of each."""
    device = next(model.parameters()).device
    results: list[_Scored] = []
    captured: dict[str, torch.Tensor] = {}

    def record(activation: torch.Tensor) -> None:
        captured["x"] = activation.detach()

    for lo in range(0, len(contexts), batch_size):
        rows = [list(c) + list(t) for c, t in zip(contexts[lo:lo + batch_size],
                                                  continuations[lo:lo + batch_size], strict=True)]
        width = max(len(r) for r in rows)
        # Right padding: causal attention keeps every real token's computation clean of it.
        input_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, device=device)
        with hooks_attached(model, {hook: record}):
            logits = model(input_ids=input_ids, use_cache=False).logits  # [B, W, vocab]
        x = captured["x"]  # [B, W, d]
        for i, (context, tokens) in enumerate(zip(contexts[lo:lo + batch_size],
                                                  continuations[lo:lo + batch_size], strict=True)):
            p, n = len(context), len(tokens)
            if n == 0:
                results.append(_Scored(torch.zeros(0), torch.zeros(0)))
                continue
            sae_in = x[i, p:p + n].to(sae.W_dec.device, torch.float32)  # [n, d]
            acts = sae.encode(sae_in)[:, feature].float().cpu()  # [n]
            logprobs = torch.log_softmax(logits[i, p - 1:p + n - 1].float(), dim=-1)  # [n, vocab]
            target = torch.tensor(tokens, device=logprobs.device)
            nll = -logprobs.gather(1, target[:, None]).squeeze(1).cpu()  # [n]
            results.append(_Scored(acts, nll))
    return results


def pooled_loss(scored: Sequence[_Scored]) -> float:
    """Mean NLL over every scored token (NaN when there is none)."""
    n = sum(int(s.nll.numel()) for s in scored)
    return sum(float(s.nll.double().sum()) for s in scored) / n if n else math.nan


def combined_score(concept: float, fluency: float) -> float:
    """The harmonic mean of the concept and fluency scores (0 when either is 0)."""
    return 0.0 if concept <= 0 or fluency <= 0 else 2 * concept * fluency / (concept + fluency)


def fluency_score(loss: float, reference_loss: float) -> float:
    """min(1, reference loss / loss); 0 when either is unknown (no tokens scored)."""
    if not (math.isfinite(loss) and math.isfinite(reference_loss)):
        return 0.0
    return 1.0 if loss <= 0 else min(1.0, reference_loss / loss)


def make_row(variant: str, coefficient: float | None, scored: Sequence[_Scored], max_activation: float,
             reference_loss: float, examples: tuple[tuple[str, str], ...] = ()) -> SteeringRow:
    """Pool the scored tokens of every completion into one row (module docstring)."""
    n = sum(int(s.activations.numel()) for s in scored)
    fires = sum(int((s.activations > 0).sum()) for s in scored)
    total = sum(float(s.activations.double().sum()) for s in scored)
    fire_fraction = fires / n if n else 0.0
    mean_activation = total / n if n else 0.0
    loss = pooled_loss(scored)
    reference = loss if variant == "unsteered" else reference_loss
    fluency = fluency_score(loss, reference)
    return SteeringRow(variant, coefficient, n, fire_fraction, mean_activation,
                       mean_activation / max_activation, loss, loss / reference if n else math.nan,
                       fire_fraction, fluency, combined_score(fire_fraction, fluency), examples)


def best_coefficient(rows: Sequence[SteeringRow]) -> float:
    """The coefficient with the highest combined score (ties: the smaller coefficient)."""
    scored = [r for r in rows if r.coefficient is not None]
    if not scored:
        raise SteerEvalError("no rows with a coefficient to choose from")
    best = max(scored, key=lambda r: (r.combined, -float(r.coefficient or 0.0)))
    return float(best.coefficient or 0.0)


def concept_text(feature: Feature, max_tokens: int = 3) -> str:
    """What the prompt baseline asks for: a user label, else the most frequent activating tokens
    (stripped, case-insensitively distinct), else the label itself."""
    if feature.label_source == "user" and feature.label.strip():
        return feature.label.strip()
    tokens: list[str] = []
    for token, _ in feature.top_tokens:
        text = token.strip()
        if text and text.lower() not in {t.lower() for t in tokens}:
            tokens.append(text)
    if tokens:
        return ", ".join(tokens[:max_tokens])
    return feature.label.strip() or f"feature {feature.id}"


# ---- DiffMean ------------------------------------------------------------------------------------


def open_store(dictionary: FeatureDictionary, store_url: str | None) -> tuple[ActivationStore | None, str]:
    """The store to compute DiffMean over: `store_url`, else the dictionary's recorded store (a
    relative path is tried from the working directory, then from each folder above the
    dictionary). (None, why) when none opens."""
    recorded = dictionary.info.get("store")
    if store_url is None and not recorded:
        return None, "no store given and the dictionary records none; pass store_url"
    url = str(store_url if store_url is not None else recorded)
    candidates = [url]
    if store_url is None and "://" not in url and not Path(url).is_absolute():
        candidates += [str(parent / url) for parent in Path(dictionary.path).resolve().parents]
    errors = []
    for candidate in candidates:
        if "://" not in candidate and not Path(candidate).exists():
            continue
        try:
            store = ActivationStore.open(candidate)
            store.require_complete()
            return store, ""
        except SaeworksError as err:
            errors.append(str(err))
    if errors:
        return None, errors[0]
    return None, (f"the store {url!r} cannot be found (from the working directory or above the "
                  "dictionary); pass store_url")


def diffmean_selection(store: ActivationStore, first_kept: int, max_rows: int | None) -> RowSelection:
    """The rows DiffMean reads: the store's exclusions, positions from the SAE's first kept one."""
    selection = RowSelection.of_store(store, max_rows)
    return RowSelection(max(selection.first_positions, first_kept), selection.special_token_ids, max_rows)


@torch.no_grad()
def diffmean_vector(sae: SparseAutoencoder, store: ActivationStore, hook: str, feature: int,
                    selection: RowSelection, batch_rows: int = 4096) -> DiffMean:
    """Mean of the rows of `hook` where `feature` fires minus the mean of those where it does not,
    over the kept rows of `selection` in store order."""
    if hook not in store.hooks:
        raise SteerEvalError(f"store {store.url!r} has no hook {hook!r} (it holds {', '.join(store.hooks)})")
    if store.d(hook) != sae.d_in:
        raise SteerEvalError(f"{hook} in store {store.url!r} is {store.d(hook)} wide, the SAE reads "
                             f"{sae.d_in}")
    device = sae.W_dec.device
    sums = torch.zeros(2, sae.d_in, dtype=torch.float64, device=device)  # [off/on, d]
    counts = [0, 0]
    for batch in iter_kept_rows(store, hook, selection, batch_rows):
        x = batch.activations.to(device)  # [rows, d] float32
        fires = sae.encode(x)[:, feature] > 0  # [rows]
        sums[1] += x[fires].double().sum(dim=0)
        sums[0] += x[~fires].double().sum(dim=0)
        counts[1] += int(fires.sum())
        counts[0] += int((~fires).sum())
    n = counts[0] + counts[1]
    if counts[1] == 0 or counts[0] == 0:
        what = "never" if counts[1] == 0 else "always"
        raise SteerEvalError(f"feature {feature} {what} fires in the {n} store rows read, so it has no "
                             "DiffMean direction; raise diffmean_rows")
    vector = sums[1] / counts[1] - sums[0] / counts[0]
    return DiffMean(vector.float().cpu(), n, counts[1])


# ---- the figure ----------------------------------------------------------------------------------

_COLOURS = {"unsteered": "#444444", "feature": "#3b6ea8", "diffmean": "#c0504d", "prompt": "#6a9e3f"}


def concept_fluency_figure(result: SteeringEvaluation) -> Figure:
    """Concept (fire fraction) against fluency (loss ratio) per coefficient: one line per steered
    variant, points labelled with their coefficient; the unsteered and prompt baselines as points."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for variant in VARIANTS:
        rows = [r for r in result.variant_rows(variant) if math.isfinite(r.loss_ratio)]
        if not rows:
            continue
        xs, ys = [r.fire_fraction for r in rows], [r.loss_ratio for r in rows]
        colour = _COLOURS[variant]
        if variant in STEERED:
            ax.plot(xs, ys, marker="o", color=colour, label=variant)
            for r in rows:
                ax.annotate(f"{r.coefficient:g}", (r.fire_fraction, r.loss_ratio), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=colour)
        else:
            ax.scatter(xs, ys, marker="s" if variant == "unsteered" else "^", color=colour, label=variant,
                       zorder=3)
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
    ax.set_xlabel("concept: fraction of generated tokens where the feature fires")
    ax.set_ylabel("loss / unsteered loss (lower is more fluent)")
    ax.set_title(f"Steering feature {result.feature} ({result.settings.method}): best "
                 f"{'-' if result.best is None else f'{result.best:g}'}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    return buffer.getvalue()
