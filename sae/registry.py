"""The one registry of SAE architectures: the loader, the CLI choices and the tests all read it."""

from __future__ import annotations

from sae.base import SparseAutoencoder
from sae.config import SAEConfig
from sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSAE,)
}


class UnknownArchitectureError(ValueError):
    """An `architecture` string that no module registers."""


def architecture_class(name: str) -> type[SparseAutoencoder]:
    """The class registered under `name`, or an error listing the registry."""
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown SAE architecture {name!r}; registered: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def create_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of a resolved config."""
    return architecture_class(cfg.architecture)(cfg)
