"""Request bodies of the service and their limits: everything a client sends is checked here
(FastAPI answers 422 with the field and the reason) before any work starts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_TEXT_CHARS = 4000
"""Longest text or prompt accepted (characters; the model's own context limit applies too)."""
MAX_TOP = 50
"""Most features reported per token by the inspector."""
MAX_STEER_FEATURES = 16
MAX_STRENGTH = 200.0
"""Largest |strength| (in units of the feature's max activation, or raw units with raw=true)."""
MAX_COMPLETION_TOKENS = 256
MAX_LOGPROBS = 20
MAX_PER_PAGE = 100
MAX_LABEL_CHARS = 500

STEER_METHODS = {
    "SIMPLE_ADDITIVE": "additive", "ORTHOGONAL_DECOMP": "orthogonal", "CLAMP": "clamp",
    "PROJECTION_CAP": "projection_cap", "additive": "additive", "orthogonal": "orthogonal",
    "clamp": "clamp", "projection_cap": "projection_cap",
}
"""Neuronpedia's steer_method names (and saeworks' own) -> saeworks' intervention methods."""

SteerMethod = Literal["SIMPLE_ADDITIVE", "ORTHOGONAL_DECOMP", "CLAMP", "PROJECTION_CAP",
                      "additive", "orthogonal", "clamp", "projection_cap"]


class InspectRequest(BaseModel):
    """Which features fire on a text."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    top: int = Field(5, ge=1, le=MAX_TOP, description="features reported per token")
    ranked: int = Field(20, ge=1, le=200, description="features ranked over the whole text")


class ActivationRequest(BaseModel):
    """One feature's activation on each token of a text (Neuronpedia's activation/new)."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    index: int = Field(ge=0, description="feature id")


class SteerFeature(BaseModel):
    index: int = Field(ge=0, description="feature id")
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH,
                            description="multiples of the feature's max activation (raw units with "
                                        "raw=true); for ORTHOGONAL_DECOMP the multiplier of the parallel "
                                        "component")


class SteerRequest(BaseModel):
    """Neuronpedia's steering request; strengths are in units of each feature's max activation."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    features: list[SteerFeature] = Field(min_length=1, max_length=MAX_STEER_FEATURES)
    steer_method: SteerMethod = "SIMPLE_ADDITIVE"
    types: list[Literal["STEERED", "DEFAULT"]] = Field(default=["STEERED", "DEFAULT"], min_length=1,
                                                       max_length=2)
    n_completion_tokens: int = Field(32, ge=1, le=MAX_COMPLETION_TOKENS)
    temperature: float = Field(0.5, ge=0, le=10, description="0 decodes greedily")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    n_logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS)
    freq_penalty: float = Field(0.0, ge=-10, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    strength_multiplier: float = Field(1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH)
    raw: bool = Field(False, description="strengths in raw activation units")


class LabelEdit(BaseModel):
    label: str = Field(max_length=MAX_LABEL_CHARS, description='the new label; "" restores the automatic one')
