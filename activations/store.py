"""The activation store: one Zarr v3 group per harvest, read by training and analysis.

Layout (rows are tokens; row r is position r % context_size of window r // context_size):

    <store>/
      zarr.json                 group attributes: identity, geometry, completion (see README)
      <hook name>/              [n_tokens, d] activations, float16 | float32 | bfloat16-as-uint16
      token_ids/                [n_tokens] int32, the token that produced each row
      window/                   [n_tokens] int32, the window each row belongs to
      position/                 [n_tokens] int32, the row's position in its window
      shard_done/               [n_shards] uint8, 1 once every row of that shard is written

A shard (`chunks_per_shard` chunks of whole windows) is the unit of writing: one process writes
it in full, then sets its `shard_done` flag, which is a separate object per shard, so processes
never write the same file and a killed harvest redoes exactly the shards it had not finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.errors import GroupNotFoundError

from saeworks.sae.errors import SaeworksError
from saeworks.sae.version import package_version

FORMAT_VERSION = 1
TOKEN_IDS = "token_ids"
WINDOW = "window"
POSITION = "position"
SHARD_DONE = "shard_done"
INDEX_ARRAYS = (TOKEN_IDS, WINDOW, POSITION)


class StoreError(SaeworksError, RuntimeError):
    """A store that is missing, corrupt, incomplete, or made by another configuration."""


@dataclass(frozen=True)
class StoreGeometry:
    """How rows are grouped into chunks (read unit) and shards (write unit)."""

    n_windows: int
    context_size: int
    windows_per_chunk: int
    chunks_per_shard: int

    @classmethod
    def plan(cls, n_windows: int, context_size: int, chunk_tokens: int, chunks_per_shard: int
             ) -> StoreGeometry:
        """Chunks hold whole windows: `chunk_tokens` rounded down to a multiple of the window."""
        return cls(n_windows, context_size, max(1, chunk_tokens // context_size), chunks_per_shard)

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.context_size

    @property
    def chunk_rows(self) -> int:
        return self.windows_per_chunk * self.context_size

    @property
    def windows_per_shard(self) -> int:
        return self.windows_per_chunk * self.chunks_per_shard

    @property
    def shard_rows(self) -> int:
        return self.windows_per_shard * self.context_size

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_windows / self.windows_per_shard)

    def shard_windows(self, shard: int) -> range:
        """Global window indices held by one shard."""
        start = shard * self.windows_per_shard
        return range(start, min(start + self.windows_per_shard, self.n_windows))


def _compressors(name: str, itemsize: int) -> Any:
    if name == "none":
        return None
    if name == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)
    return zarr.codecs.ZstdCodec(level=1)


class ActivationStore:
    """An opened store: its attributes, its arrays, and typed row reads."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self.group = group
        self.url = url
        self.attrs: dict[str, Any] = dict(group.attrs)
        if self.attrs.get("saeworks_store_format") != FORMAT_VERSION:
            raise StoreError(f"{url!r} is not a saeworks activation store (no saeworks_store_format)")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> ActivationStore:
        """Open an existing store; a missing or foreign path is a StoreError that says what to do."""
        try:
            group = zarr.open_group(url, mode=mode)  # type: ignore[arg-type]
        except (GroupNotFoundError, FileNotFoundError) as err:
            raise StoreError(
                f"no activation store at {url!r}; run `saeworks harvest CONFIG` to make one"
            ) from err
        return cls(group, url)

    @property
    def hooks(self) -> list[str]:
        return list(self.attrs["hooks"])

    @property
    def geometry(self) -> StoreGeometry:
        return StoreGeometry(**self.attrs["geometry"])

    @property
    def context_size(self) -> int:
        return int(self.attrs["context_size"])

    @property
    def n_tokens(self) -> int:
        return self.geometry.n_tokens

    @property
    def store_dtype(self) -> str:
        return str(self.attrs["store_dtype"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def d(self, hook: str) -> int:
        return int(self.attrs["d"][hook])

    def array(self, name: str) -> zarr.Array:
        if name not in self.attrs["hooks"] and name not in (*INDEX_ARRAYS, SHARD_DONE):
            raise StoreError(
                f"store {self.url!r} has no hook {name!r}; it holds {', '.join(self.hooks)}"
            )
        return self.group[name]  # type: ignore[return-value]

    def require_complete(self) -> None:
        """Refuse to read a store whose harvest has not finished."""
        if not self.complete:
            done = int(self.attrs.get("n_tokens_complete", 0))
            raise StoreError(
                f"store {self.url!r} is incomplete ({done} of {self.n_tokens} tokens); rerun the "
                "same `saeworks harvest` command to resume it"
            )

    def read_rows(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one hook as a tensor in the stored dtype `[rows, d]`."""
        return to_tensor(np.asarray(self.array(hook)[start:stop]), self.store_dtype)

    def shards_done(self) -> np.ndarray:
        """Boolean per shard: fully written."""
        return np.asarray(self.array(SHARD_DONE)[:]).astype(bool)


def to_tensor(raw: np.ndarray, store_dtype: str) -> torch.Tensor:
    """Stored rows to a tensor, restoring bfloat16 from its raw 16 bits."""
    tensor = torch.from_numpy(raw)
    if store_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def to_storable(activations: torch.Tensor, store_dtype: str, hook: str) -> np.ndarray:
    """Activations `[rows, d]` to the on-disk representation (bfloat16 as uint16 bits).

    Refuses inf/NaN: float16 overflows above 65,504, which massive activations can reach.
    """
    converted = activations.to(getattr(torch, store_dtype))
    if not torch.isfinite(converted).all():
        raise StoreError(
            f"activations of {hook} are not finite in {store_dtype} (float16 overflows above 65504, "
            "or the model produced NaN); set harvest.store_dtype=bfloat16 or float32"
        )
    if store_dtype == "bfloat16":
        return converted.view(torch.int16).cpu().numpy().view(np.uint16)
    return converted.cpu().numpy()


def create_store(url: str, identity: Mapping[str, Any], geometry: StoreGeometry,
                 hook_dims: Mapping[str, int], store_dtype: str, compression: str,
                 extra_attrs: Mapping[str, Any]) -> ActivationStore:
    """Create an empty store (overwriting nothing: the caller checked there is none)."""
    group = zarr.open_group(url, mode="w-")  # type: ignore[arg-type]
    disk_dtype = "uint16" if store_dtype == "bfloat16" else store_dtype
    itemsize = np.dtype(disk_dtype).itemsize
    for hook, d in hook_dims.items():
        array = group.create_array(
            hook, shape=(geometry.n_tokens, d), dtype=disk_dtype,
            chunks=(geometry.chunk_rows, d), shards=(geometry.shard_rows, d),
            compressors=_compressors(compression, itemsize), fill_value=0,
        )
        array.attrs["dtype"] = store_dtype
    for name in INDEX_ARRAYS:
        group.create_array(name, shape=(geometry.n_tokens,), dtype="int32",
                           chunks=(geometry.chunk_rows,), shards=(geometry.shard_rows,),
                           compressors=zarr.codecs.ZstdCodec(level=3), fill_value=-1)
    group.create_array(SHARD_DONE, shape=(geometry.n_shards,), dtype="uint8", chunks=(1,),
                       fill_value=0, compressors=None)
    group.attrs.update({
        "saeworks_store_format": FORMAT_VERSION,
        "saeworks_version": package_version(),
        "identity": dict(identity),
        "hooks": list(hook_dims),
        "d": dict(hook_dims),
        "context_size": geometry.context_size,
        "store_dtype": store_dtype,
        "geometry": asdict(geometry),
        "n_tokens_complete": 0,
        "complete": False,
        **extra_attrs,
    })
    return ActivationStore(group, url)


def identity_mismatch(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Fields whose values differ between a store's identity and the current config's."""
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k)!r} in the store, {wanted.get(k)!r} now"
            for k in keys if stored.get(k) != wanted.get(k)]


def write_shard(store: ActivationStore, shard: int, activations: Mapping[str, np.ndarray],
                token_ids: np.ndarray) -> None:
    """Write the rows of one shard's windows (`token_ids` is `[windows, context_size]`; the last
    shard of a dataset that ran out may hold fewer), then mark it done: the flag is written last."""
    geometry = store.geometry
    first_window = geometry.shard_windows(shard).start
    start = first_window * geometry.context_size
    stop = start + token_ids.size
    rows = np.arange(start, stop)
    for hook, values in activations.items():
        store.array(hook)[start:stop] = values
    store.array(TOKEN_IDS)[start:stop] = token_ids.reshape(-1)
    store.array(WINDOW)[start:stop] = (rows // geometry.context_size).astype(np.int32)
    store.array(POSITION)[start:stop] = (rows % geometry.context_size).astype(np.int32)
    store.array(SHARD_DONE)[shard] = 1


def record_progress(store: ActivationStore) -> int:
    """Recompute `n_tokens_complete` from the shard flags and save it (rank 0 only)."""
    geometry, done = store.geometry, store.shards_done()
    tokens = sum(len(geometry.shard_windows(s)) for s in np.flatnonzero(done).tolist())
    tokens *= geometry.context_size
    store.group.attrs["n_tokens_complete"] = int(tokens)
    return int(tokens)


def finalize(store: ActivationStore, n_windows: int) -> None:
    """Trim the arrays to the windows the dataset really had, then mark the store complete."""
    geometry = store.geometry
    if n_windows < geometry.n_windows:
        trimmed = StoreGeometry(n_windows, geometry.context_size, geometry.windows_per_chunk,
                                geometry.chunks_per_shard)
        for hook in store.hooks:
            store.array(hook).resize((trimmed.n_tokens, store.d(hook)))
        for name in INDEX_ARRAYS:
            store.array(name).resize((trimmed.n_tokens,))
        store.array(SHARD_DONE).resize((trimmed.n_shards,))
        store.group.attrs["geometry"] = asdict(trimmed)
    store.attrs = dict(store.group.attrs)
    if not store.shards_done().all():
        raise StoreError(f"store {store.url!r}: some shards were never written; rerun to resume")
    record_progress(store)
    store.group.attrs["complete"] = True
    store.attrs = dict(store.group.attrs)
