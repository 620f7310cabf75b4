"""Steering from a feature dictionary, for the CLI and the Python API: open the dictionary, load
its model once, turn feature specs (`1931=+2`, `55=clamp:0`) into interventions, generate.
(`saeworks.steer` is the package of the interventions themselves, hence `steer_completions`.)

    import saeworks
    with saeworks.open_dictionary("runs/demo/dictionaries/topk-k32-9216") as d:
        for result in saeworks.steer_completions(d, "My favourite food is", "1710=+4"):
            print(result.default.text, "|", result.steered.text)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from saeworks.eval.dictionary import FeatureDictionary
from saeworks.steer.generate import SideBySide, prompt_ids, side_by_side
from saeworks.steer.interventions import FeatureSource, Intervention
from saeworks.steer.positions import Positions
from saeworks.steer.settings import GenerationError, GenerationSettings
from saeworks.steer.spec import parse_feature, parse_vector

SETTING_NAMES = tuple(f.name for f in fields(GenerationSettings))


class SteeringSession:
    """A dictionary with its SAE, and its model and tokenizer loaded on first use (reuse one
    session for many prompts). Specs are checked before the model loads, so a typo fails fast."""

    def __init__(self, dictionary: FeatureDictionary, source: FeatureSource) -> None:
        self.dictionary, self.source = dictionary, source

    @classmethod
    def open(cls, dictionary: str | Path | FeatureDictionary, *, device: str = "cpu",
             dtype: str | None = None) -> SteeringSession:
        """`dictionary` is a path, or an open dictionary whose loaded model is then shared."""
        if not isinstance(dictionary, FeatureDictionary):
            dictionary = FeatureDictionary.open(dictionary, readonly=True, device=device, dtype=dtype)
        sae = dictionary._runtime[2] if dictionary._runtime is not None else None
        return cls(dictionary, FeatureSource.from_dictionary(dictionary, dictionary.device, sae=sae))

    @property
    def model(self) -> Any:
        return self.dictionary._load_runtime()[0]

    @cached_property
    def tokenizer(self) -> Any:
        if self.dictionary._runtime is not None:
            return self.dictionary._runtime[1]
        from saeworks.activations.model import load_tokenizer

        return load_tokenizer(self.dictionary.model_config())

    @property
    def prepend_bos(self) -> bool:
        return self.source.prepend_bos

    def interventions(self, features: Sequence[str | Intervention] = (), vectors: Sequence[str] = (), *,
                      method: str = "additive", positions: str | Sequence[int] | Positions | None = None,
                      raw: bool = False, resample_from: str | None = None) -> list[Intervention]:
        """Interventions from specs (`1931=+2`, `55=clamp:0`, `FILE@HOOK=+4`) or objects, as given."""
        where = Positions.parse(positions)
        other = None
        if resample_from is not None:
            other = torch.tensor(prompt_ids(self.tokenizer, resample_from, self.prepend_bos))
        found: list[Intervention] = []
        for spec in features:
            found.append(spec if not isinstance(spec, str) else parse_feature(
                spec, self.source, default_method=method, positions=where, raw=raw, resample_from=other))
        found += [parse_vector(spec, default_method=method, positions=where) for spec in vectors]
        return found

    def side_by_side(self, prompts: str | Sequence[str], interventions: Sequence[Intervention],
                     settings: GenerationSettings | None = None) -> list[SideBySide]:
        return side_by_side(self.model, self.tokenizer, prompts, interventions, settings,
                            prepend_bos=self.prepend_bos)


def steer_completions(dictionary: str | Path | FeatureDictionary, prompts: str | Sequence[str],
          *features: str | Intervention, vectors: Sequence[str] = (), method: str = "additive",
          positions: str | Sequence[int] | Positions | None = None, raw: bool = False,
          resample_from: str | None = None, device: str = "cpu", dtype: str | None = None,
          **settings: Any) -> list[SideBySide]:
    """Default and steered completions of each prompt, same seed and settings.

    `features` are specs on the dictionary's SAE (`"1931=+2"`, `"55=clamp:0"`, `"7=zero"`; a bare
    number uses `method`) or intervention objects; `vectors` raw vectors (`"v.safetensors@HOOK=+4"`).
    `settings` are GenerationSettings fields (max_new_tokens, temperature, top_p, top_k,
    frequency_penalty, seed, n_logprobs, stop_at_eos). Pass an open dictionary to load its model
    once for many calls.
    """
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise GenerationError(f"unknown generation settings {', '.join(unknown)}; valid: "
                              f"{', '.join(SETTING_NAMES)}")
    session = SteeringSession.open(dictionary, device=device, dtype=dtype)
    chosen = session.interventions(features, vectors, method=method, positions=positions, raw=raw,
                                   resample_from=resample_from)
    return session.side_by_side(prompts, chosen, GenerationSettings(**settings))
