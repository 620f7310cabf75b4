"""The `train:` section of a run config: which SAEs, on which activations, with which recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saeworks.activations.config import DataConfig, HarvestConfig, ModelConfig, ReaderConfig
from saeworks.sae.config import SAEConfig
from saeworks.sae.configio import require
from saeworks.sae.paths import RunLayout


@dataclass
class TrainConfig:
    """Training one or several SAEs from one pass over the activations (they share the reading)."""

    saes: list[SAEConfig] = field(default_factory=lambda: [SAEConfig()])
    """The SAEs to train side by side on the same batches, e.g. a sweep over k or width."""
    hook: str | None = None
    """Hook point to train on; default: the store's first hook (or harvest.hooks[0] for source=model)."""
    hooks: list[str] | None = None
    """Several hook points trained at once: every SAE of `saes` is trained on each, all fed by one
    store read (or one model forward) per batch; saved as `<run_dir>/saes/<hook>--<name>`. Set
    either this or `hook`, not both."""
    distribute_hooks: bool = False
    """With several processes: each trains only the SAEs of its hooks (hook i on rank i mod W, as
    sparsify's `distribute_modules`); every rank still reads its share of the rows of every hook,
    and a hook's global batch is gathered onto its owner, so each SAE sees exactly the batches one
    process would. Saves memory and compute per rank; needs no gradient all-reduce."""
    store: str | None = None
    """Activation store URL; default: the run's store (`harvest.store` or `<run_dir>/activations.zarr`)."""
    source: Literal["store", "model"] = "store"
    """`store`: read harvested activations. `model`: run the model on the fly (same windows and
    hook code as the harvester, rows shuffled in memory, nothing written to disk)."""
    device: str = "auto"
    """`auto` (this rank's GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    total_tokens: int = 1_000_000
    """Training tokens (rows) over all processes; steps = total_tokens // batch_size."""
    batch_size: int = 4096
    """Rows per optimiser step over all processes; each of W processes reads batch_size / W
    (with latent_shards = S: each of the W / S replicas reads batch_size * S / W)."""
    latent_shards: int = 1
    """Split every SAE's latents over this many processes (tensor parallelism, for dictionaries too
    wide for one device): each holds d_sae / S latents and their Adam state, the top-k is found
    across shards. The processes form a (W / S) x S mesh: data parallel over W / S replicas, each
    sharded S ways. TopK and BatchTopK only; W must be a multiple of S."""
    lr: float | None = None
    """Peak Adam learning rate; None: 2e-4 / sqrt(d_sae / 2**14) per SAE (Gao et al. 2024, 2.4,
    as in EleutherAI's sparsify)."""
    adam_beta1: float = 0.9
    """Adam beta1 (Gao et al. 2024, appendix A)."""
    adam_beta2: float = 0.999
    """Adam beta2 (Gao et al. 2024, appendix A)."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (Gao et al. 2024, appendix A)."""
    lr_warmup_tokens: int = 0
    """Tokens over which the learning rate rises linearly from 0 to its peak."""
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    """Decay from the end of the warm-up to `lr_final_fraction` of the peak at total_tokens."""
    lr_final_fraction: float = 0.0
    """Learning rate at the end of the decay, as a fraction of the peak."""
    sparsity_warmup_tokens: int = 0
    """Tokens over which each SAE's L1/L0 coefficient rises linearly from 0 (relu, jumprelu)."""
    grad_clip_norm: float | None = 1.0
    """Clip each SAE's gradient norm to this (Anthropic, April 2024 update); None: no clipping."""
    autocast: Literal["none", "bfloat16", "auto"] = "none"
    """Run the SAE forward under torch.autocast in bfloat16 (weights and Adam stay float32). `auto`:
    bfloat16 where `model.dtype=auto` would pick it (a bf16-capable GPU, or a CPU measured to multiply
    bf16 faster); the saved SAE records what it resolved to."""
    normalize_inputs: bool = True
    """Scale inputs by one constant so that their mean squared norm is d_in (estimated once on
    `init_sample_rows` rows); the scale is folded into the saved weights."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias, computed on the (scaled) initial sample (Bricken et al. 2023)."""
    init_sample_rows: int = 16384
    """Rows (over all processes) read once at the start for the input scale and b_dec."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead and joins AuxK (Gao et al. 2024)."""
    dense_fraction: float = 0.1
    """Latents that fire on more than this fraction of a logged batch's tokens are reported dense."""
    checkpoint_every_tokens: int | None = None
    """Write a checkpoint every this many tokens (rounded to whole steps); None: only at the end."""
    stop_after_tokens: int | None = None
    """End this invocation after this many tokens with a checkpoint and no saved SAE (for jobs
    with a time limit); `resume=true` continues it."""
    resume: bool = False
    """Continue from the latest checkpoint in `<run_dir>/checkpoints` (refused if from another config)."""
    seed: int = 0
    """Seed of the SAE initialisation (and of torch, numpy and python's RNGs)."""
    log_every_steps: int = 50
    """Steps between metrics lines, progress-bar updates and wandb logs."""
    wandb: bool = True
    """Log to Weights & Biases under `<run_dir>/logs/wandb`."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb stays offline (synchronise later with `wandb sync`) unless set to online."""
    wandb_project: str = "saeworks"
    """wandb project name."""
    model_buffer_rows: int = 65536
    """source=model: rows held by the in-memory shuffle buffer per process."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How the store is read (shuffle buffer, seed, prefetch, exclusions). Its batch_size is set
    by the trainer to batch_size / number of processes; the value given here is not used."""

    def __post_init__(self) -> None:
        require(len(self.saes) > 0, "saes", "list at least one SAE")
        for name in ("total_tokens", "batch_size", "init_sample_rows", "dead_after_tokens",
                     "log_every_steps", "model_buffer_rows"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.latent_shards > 0, "latent_shards", f"must be positive, got {self.latent_shards}")
        require(self.total_tokens >= self.batch_size, "total_tokens",
                f"{self.total_tokens} is less than one batch of batch_size={self.batch_size}")
        require(self.lr is None or self.lr > 0, "lr", f"must be positive or null, got {self.lr}")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        require(self.adam_eps > 0, "adam_eps", f"must be positive, got {self.adam_eps}")
        require(self.lr_warmup_tokens >= 0, "lr_warmup_tokens", "must be non-negative")
        require(0 <= self.lr_final_fraction <= 1, "lr_final_fraction",
                f"must be in [0, 1], got {self.lr_final_fraction}")
        require(self.sparsity_warmup_tokens >= 0, "sparsity_warmup_tokens", "must be non-negative")
        require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm",
                f"must be positive or null, got {self.grad_clip_norm}")
        require(0 < self.dense_fraction <= 1, "dense_fraction",
                f"must be in (0, 1], got {self.dense_fraction}")
        for name in ("checkpoint_every_tokens", "stop_after_tokens"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be positive or null, got {value}")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                "device", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N")
        require(self.hook is None or bool(self.hook), "hook", "must name a hook point or be null")
        if self.hooks is not None:
            require(self.hook is None, "hooks", f"set either hook ({self.hook!r}) or hooks "
                    f"({self.hooks}), not both; hooks=[{self.hook}] trains that one hook")
            require(len(self.hooks) > 0, "hooks", "list at least one hook point, or leave it null "
                    "(then `hook`, or the store's first hook, is trained)")
            require(all(self.hooks), "hooks", f"{self.hooks} holds an empty name")
            twice = sorted({h for h in self.hooks if self.hooks.count(h) > 1})
            require(not twice, "hooks", f"{', '.join(twice)} listed more than once")
        several = self.distribute_hooks or (self.hooks is not None and len(self.hooks) > 1)
        require(self.latent_shards == 1 or not several, "latent_shards", "latent sharding trains "
                "one hook at a time: drop hooks/distribute_hooks, or set latent_shards=1")


@dataclass(frozen=True)
class TrainJob:
    """The config sections one training run reads, and where it writes (not the whole run config)."""

    train: TrainConfig
    layout: RunLayout
    """The run's directory: checkpoints, logs and the saved SAEs go under it."""
    store_url: str
    """The run's activation store (`train.store` overrides it)."""
    model: ModelConfig
    """The model, for `train.source=model` (a store records its own)."""
    data: DataConfig
    """The text, for `train.source=model`."""
    harvest: HarvestConfig
    """For `train.source=model`: its first hook is the default hook and its batch size the windows
    per forward pass, as the harvester would use them."""
