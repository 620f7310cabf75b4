"""saeworks: sparse autoencoders for Hugging Face language models, from raw text to a feature dictionary.

The public API (documented in the README, "Python API"):

    saeworks.load_sae(path_or_repo, sae_id=None)      an SAE from a directory or the HF hub
    saeworks.open_dictionary(path)                    a feature dictionary (browse, search, query)
    saeworks.evaluate(sae, model=..., text=... | dataset=... | store=...)
    saeworks.load_config(path_or_config, "key=value", ...)
    saeworks.harvest / train_saes / analyze / run     the stages, from a config object or YAML path
    saeworks.verify_store(url)                        check every chunk of an activation store
    saeworks.steer_completions(dictionary, prompt, "1931=+2", ...)   default vs steered completions
    saeworks.intervene(model, [saeworks.FeatureIntervention(...)])  steer/ablate any forward or generate
    saeworks.evaluate_steering(dictionary, feature, saeworks.SteerEvalSettings(...))   concept vs fluency

The stages themselves are the subpackages `saeworks.sae`, `saeworks.activations`,
`saeworks.train`, `saeworks.eval` and `saeworks.steer`. Names load on first use, so
`import saeworks` (and the CLI's `--help`) stay fast and import no model code until it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from saeworks.sae.version import package_version

if TYPE_CHECKING:
    from saeworks.activations.verify import verify_store
    from saeworks.api import analyze, evaluate, harvest, load_config, open_dictionary, run, train_saes
    from saeworks.eval.dictionary import Feature, FeatureDictionary
    from saeworks.eval.evaluate import EvalReport
    from saeworks.hub import load_sae
    from saeworks.run_config import RunConfig
    from saeworks.sae.base import SparseAutoencoder
    from saeworks.sae.errors import SaeworksError
    from saeworks.steer.evaluation import SteerEvalSettings, evaluate_steering
    from saeworks.steer.generate import generate
    from saeworks.steer.interventions import FeatureIntervention, FeatureSource, VectorIntervention, intervene
    from saeworks.steer.positions import Positions
    from saeworks.steer.settings import GenerationSettings
    from saeworks.steering import SteeringSession, steer_completions

__version__ = package_version()

_EXPORTS = {
    "load_sae": "saeworks.hub",
    "open_dictionary": "saeworks.api",
    "evaluate": "saeworks.api",
    "load_config": "saeworks.api",
    "harvest": "saeworks.api",
    "train_saes": "saeworks.api",
    "analyze": "saeworks.api",
    "run": "saeworks.api",
    "RunConfig": "saeworks.run_config",
    "SparseAutoencoder": "saeworks.sae.base",
    "FeatureDictionary": "saeworks.eval.dictionary",
    "Feature": "saeworks.eval.dictionary",
    "EvalReport": "saeworks.eval.evaluate",
    "SaeworksError": "saeworks.sae.errors",
    "steer_completions": "saeworks.steering",
    "SteeringSession": "saeworks.steering",
    "FeatureIntervention": "saeworks.steer.interventions",
    "FeatureSource": "saeworks.steer.interventions",
    "VectorIntervention": "saeworks.steer.interventions",
    "intervene": "saeworks.steer.interventions",
    "Positions": "saeworks.steer.positions",
    "GenerationSettings": "saeworks.steer.settings",
    "generate": "saeworks.steer.generate",
    "evaluate_steering": "saeworks.steer.evaluation",
    "SteerEvalSettings": "saeworks.steer.evaluation",
    "verify_store": "saeworks.activations.verify",
}

__all__ = [
    "EvalReport", "Feature", "FeatureDictionary", "FeatureIntervention", "FeatureSource",
    "GenerationSettings", "Positions", "RunConfig", "SaeworksError", "SparseAutoencoder",
    "SteerEvalSettings", "SteeringSession", "VectorIntervention", "__version__", "analyze", "evaluate",
    "evaluate_steering", "generate", "harvest", "intervene", "load_config", "load_sae", "open_dictionary",
    "run", "steer_completions", "train_saes", "verify_store",
]
assert set(__all__) == {"__version__", *_EXPORTS}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'saeworks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
