"""How to sample a completion: settings with no heavy imports, so the CLI builds its options
from them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from saeworks.sae.errors import SaeworksError


class GenerationError(SaeworksError, ValueError):
    """Generation settings or prompts that cannot be used."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample a completion (Neuronpedia's steering settings, with OpenAI's frequency penalty)."""

    max_new_tokens: int = 40
    """Tokens to generate (fewer when every row has ended with EOS)."""
    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1: off)."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0: off)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per earlier occurrence in the sequence (prompt included,
    as TransformerLens and Neuronpedia count)."""
    seed: int = 0
    """Seed of every row's random stream: the same seed gives the same default completion."""
    n_logprobs: int = 5
    """Alternatives reported with each generated token's log-probability."""
    stop_at_eos: bool = True
    """A row ends at the model's end-of-sequence token."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} (must be >= 1)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (must be >= 0; 0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} (must be >= 0; 0 is off)")
        if self.n_logprobs < 0:
            problems.append(f"n_logprobs={self.n_logprobs} (must be >= 0)")
        if problems:
            raise GenerationError("bad generation settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
