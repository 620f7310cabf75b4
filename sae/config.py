"""What an SAE is: its architecture, its width and the knobs of its sparsity mechanism."""

from __future__ import annotations

from dataclasses import dataclass, replace

from saeworks.sae.configio import require


@dataclass
class SAEConfig:
    """One sparse autoencoder. `d_in` comes from the activation store when left unset."""

    architecture: str = "topk"
    """Registry key: relu, topk, batchtopk, jumprelu, matryoshka_batchtopk (see sae/registry.py)."""
    name: str | None = None
    """Directory name under `<run_dir>/saes/`; default derived from architecture and width."""
    d_in: int | None = None
    """Input width; filled from the store (or the model) when unset."""
    expansion_factor: int = 16
    """d_sae = expansion_factor * d_in, unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents (overrides expansion_factor)."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka_batchtopk)."""
    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty (relu; Anthropic, April 2024 update)."""
    l0_coefficient: float = 1.0
    """Weight of the L0 penalty (jumprelu; Rajamanoharan et al. 2024)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through threshold gradient (jumprelu)."""
    jumprelu_init_threshold: float = 0.001
    """Initial threshold of every latent (jumprelu)."""
    matryoshka_prefixes: list[int] | None = None
    """Nested dictionary sizes, ascending, the last one d_sae (matryoshka_batchtopk)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss per token; None: d_in // 2, as EleutherAI's sparsify
    (Gao et al. 2024, section 2.4, used 512 for far wider models)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024: 1/32)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (Gao et al. 2024's b_pre)."""

    def __post_init__(self) -> None:
        require(self.expansion_factor > 0, "expansion_factor",
                f"must be positive, got {self.expansion_factor}")
        require(self.d_sae is None or self.d_sae > 0, "d_sae", f"must be positive, got {self.d_sae}")
        require(self.d_in is None or self.d_in > 0, "d_in", f"must be positive, got {self.d_in}")
        require(self.k > 0, "k", f"must be positive, got {self.k}")
        require(self.aux_k is None or self.aux_k > 0, "aux_k", f"must be positive, got {self.aux_k}")
        require(self.l1_coefficient >= 0, "l1_coefficient", "must be non-negative")
        require(self.l0_coefficient >= 0, "l0_coefficient", "must be non-negative")
        require(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth", "must be positive")
        require(self.jumprelu_init_threshold > 0, "jumprelu_init_threshold", "must be positive")
        if self.d_sae is not None:
            require(self.k <= self.d_sae, "k", f"k={self.k} exceeds d_sae={self.d_sae}")

    def resolved(self, d_in: int) -> SAEConfig:
        """A copy with d_in and d_sae filled in (what an SAE module is built from)."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion_factor * d_in
        resolved = replace(self, d_in=d_in, d_sae=d_sae)
        require(resolved.k <= d_sae, "k", f"k={resolved.k} exceeds d_sae={d_sae}")
        return resolved

    @property
    def display_name(self) -> str:
        """`name`, or e.g. `topk-k32-9216` once resolved."""
        if self.name:
            return self.name
        knob = {"relu": f"l1{self.l1_coefficient:g}", "jumprelu": f"l0{self.l0_coefficient:g}"}
        return f"{self.architecture}-{knob.get(self.architecture, f'k{self.k}')}-{self.d_sae}"
