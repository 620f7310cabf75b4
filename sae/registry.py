"""The one registry of SAE architectures: the loader, the CLI choices and the tests all read it."""

from __future__ import annotations

from saeworks.sae.base import SparseAutoencoder
from saeworks.sae.batchtopk import BatchTopKSAE
from saeworks.sae.config import SAEConfig
from saeworks.sae.errors import SaeworksError
from saeworks.sae.jumprelu import JumpReLUSAE
from saeworks.sae.matryoshka import MatryoshkaBatchTopKSAE
from saeworks.sae.relu import ReLUSAE
from saeworks.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls
    for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE)
}
"""What can be trained, by the `architecture` string of SAEConfig."""

SAVED_ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
}
"""What can be loaded: the SAELens `architecture` of a saved cfg.json -> the class that runs it.
BatchTopK and Matryoshka save as "jumprelu" (a per-token threshold), ReLU as "standard"."""


class UnknownArchitectureError(SaeworksError, ValueError):
    """An `architecture` string that no module registers."""


def architecture_class(name: str) -> type[SparseAutoencoder]:
    """The class registered under `name`, or an error listing the registry."""
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown SAE architecture {name!r}; registered: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def saved_architecture_class(name: str) -> type[SparseAutoencoder]:
    """The class that loads a saved SAE of SAELens architecture `name`, or an error listing them."""
    if name not in SAVED_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"cannot load SAE architecture {name!r}; loadable (SAELens names): "
            f"{', '.join(sorted(SAVED_ARCHITECTURES))}; trainable: {', '.join(sorted(ARCHITECTURES))}"
        )
    return SAVED_ARCHITECTURES[name]


def create_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of a resolved config."""
    return architecture_class(cfg.architecture)(cfg)
