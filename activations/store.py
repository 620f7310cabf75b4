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

Integrity: every chunk of every array ends with a CRC32C (Zarr v3's `crc32c` codec after the
compressor; the shard index carries its own), checked by Zarr on every decode, and the group
attribute `chunk_checksums` says so. All reads go through `ActivationStore.read` (or its guard
`reading`), which turns a chunk that fails its checksum or does not decode into one `StoreError`
naming the array, chunk, rows and shard and the repair (`saeworks verify`, then `saeworks harvest
--repair`, see activations/verify.py). Stores written before checksums still open and read; a
flipped bit inside one of their chunks goes unnoticed unless it breaks decoding.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.abc.store import SuffixByteRequest
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync
from zarr.errors import GroupNotFoundError

from saeworks.activations.remote import STORAGE_OPTIONS, access_problem, is_remote
from saeworks.sae.errors import SaeworksError
from saeworks.sae.version import package_version

FORMAT_VERSION = 1
TOKEN_IDS = "token_ids"
WINDOW = "window"
POSITION = "position"
SHARD_DONE = "shard_done"
INDEX_ARRAYS = (TOKEN_IDS, WINDOW, POSITION)
CHECKSUM = "crc32c"
"""The value of the group attribute `chunk_checksums` of stores whose chunks carry a CRC32C."""
RESUME_ADVICE = "rerun the same `saeworks harvest` command to resume: finished shards are kept"
DECODE_ERRORS = (ValueError, RuntimeError)
"""What Zarr raises for bytes that do not decode: ValueError for a CRC32C mismatch (of a chunk or a
shard index), RuntimeError from the zstd and blosc decompressors."""


class StoreError(SaeworksError, RuntimeError):
    """A store that is missing, corrupt, incomplete, or made by another configuration."""


class StoreMetadataError(StoreError):
    """A store whose metadata (a zarr.json) is missing or unreadable: not repairable in place."""


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

    def shard_rows_range(self, shard: int) -> range:
        """Global rows held by one shard."""
        windows = self.shard_windows(shard)
        return range(windows.start * self.context_size, windows.stop * self.context_size)

    def chunk_rows_range(self, chunk: int) -> range:
        """Global rows held by one chunk of a row array (a hook or an index array)."""
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_tokens))


@dataclass(frozen=True)
class Damage:
    """One damaged piece of a store: chunks of one array that fail their checksum, do not decode,
    or hold impossible values. For `shard_done`, chunk s is the flag of shard s."""

    array: str
    chunks: range
    rows: range
    shard: int
    reason: str

    def describe(self) -> str:
        """`array 'h' chunk 3 (rows 384-511, shard 1): CRC32C checksum mismatch`."""
        if self.array == SHARD_DONE:
            where = f"the done flag of shard {self.shard} (rows {_span(self.rows)})"
        else:
            chunks = f"chunk {self.chunks.start}" if len(self.chunks) == 1 else \
                f"chunks {self.chunks.start}-{self.chunks.stop - 1}"
            where = f"array {self.array!r} {chunks} (rows {_span(self.rows)}, shard {self.shard})"
        return f"{where}: {self.reason}"


def _span(rows: range) -> str:
    return f"{rows.start}-{rows.stop - 1}" if len(rows) else "none"


def open_group(url: str, mode: str) -> zarr.Group:
    """The Zarr group at `url`: a local directory, or a remote URL opened with STORAGE_OPTIONS (no
    listings cache: activations/remote.py) as Zarr v3, which all stores are: one request for its
    zarr.json instead of four concurrent ones that also look for Zarr v2 metadata (when the
    endpoint is down, those left behind each print a traceback as they are collected)."""
    if is_remote(url):
        return zarr.open_group(url, mode=mode, zarr_format=3,  # type: ignore[arg-type]
                               storage_options=STORAGE_OPTIONS)
    return zarr.open_group(url, mode=mode)  # type: ignore[arg-type]


@contextmanager
def remote_access(url: str, doing: str, advice: str = "") -> Iterator[None]:
    """Around an operation on the store at `url`: a failure to reach a remote store (network,
    endpoint, credentials, permissions, bucket; see activations/remote.py) becomes one StoreError
    saying what could not be done (`doing`), why, and `advice`. Local stores: nothing changes."""
    try:
        yield
    except SaeworksError:
        raise
    except Exception as err:
        problem = access_problem(url, err)
        if problem is None:
            raise
        raise StoreError(f"cannot {doing} store {url!r}: {problem}" + (f"; {advice}" if advice else "")
                         ) from err


def repair_advice(url: str) -> str:
    """How to list and fix damage, for the end of every damage message."""
    return (f"run `saeworks verify {url}` to list the damage, then `saeworks harvest CONFIG --repair` "
            "(with the config that made the store) to recompute the damaged shards")


def _compressors(name: str, itemsize: int) -> Any:
    if name == "none":
        return None
    if name == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)
    return zarr.codecs.ZstdCodec(level=1)


def _chunk_codecs(compressor: Any, checksums: bool) -> list[Any]:
    """The bytes-to-bytes codecs of a chunk: the compressor, then (`checksums`) a CRC32C of the
    compressed bytes, so that a flipped bit is caught before decompression."""
    return [c for c in (compressor, zarr.codecs.Crc32cCodec() if checksums else None) if c is not None]


def has_chunk_checksums(array: zarr.Array) -> bool:
    """Whether the chunks of `array` (the inner chunks of a sharded one) end with a CRC32C."""
    codecs = array.metadata.codecs  # type: ignore[union-attr]
    inner = getattr(codecs[0], "codecs", codecs) if codecs else ()
    return any(isinstance(codec, zarr.codecs.Crc32cCodec) for codec in inner)


class ActivationStore:
    """An opened store: its attributes, its arrays, and typed row reads."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self.group = group
        self.url = url
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {}  # opened once: opening reads the metadata
        if self.attrs.get("saeworks_store_format") != FORMAT_VERSION:
            raise StoreError(f"{url!r} is not a saeworks activation store (no saeworks_store_format)")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> ActivationStore:
        """Open an existing store; a missing or foreign path is a StoreError that says what to do."""
        try:
            group = open_group(url, mode)
        except (GroupNotFoundError, FileNotFoundError) as err:
            raise StoreError(
                f"no activation store at {url!r}; run `saeworks harvest CONFIG` to make one"
            ) from err
        except Exception as err:
            problem = access_problem(url, err)  # None for a local store
            if problem is not None:
                raise StoreError(f"cannot open store {url!r}: {problem}") from err
            if not isinstance(err, ValueError):
                raise
            # zarr.json is not valid JSON
            raise StoreMetadataError(
                f"{url!r} exists but cannot be read as a store: its zarr.json is damaged ({err}); it "
                "cannot be repaired in place: restore it from a copy, or delete the store and harvest again"
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

    @property
    def chunk_checksums(self) -> bool:
        """Whether this store was written with a CRC32C on every chunk (stores before: no)."""
        return self.attrs.get("chunk_checksums") == CHECKSUM

    def array(self, name: str) -> zarr.Array:
        if name not in self.attrs["hooks"] and name not in (*INDEX_ARRAYS, SHARD_DONE):
            raise StoreError(
                f"store {self.url!r} has no hook {name!r}; it holds {', '.join(self.hooks)}"
            )
        if name not in self._arrays:
            self._arrays[name] = self._open_array(name)
        return self._arrays[name]

    def _open_array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]  # type: ignore[return-value]
        except (KeyError, ValueError) as err:  # missing, or its zarr.json is not valid JSON
            raise StoreMetadataError(
                f"store {self.url!r} is damaged: the metadata of array {name!r} ({name}/zarr.json) "
                f"is missing or unreadable ({type(err).__name__}: {err}); it cannot be repaired in "
                "place: restore it from a copy, or delete the store and harvest again"
            ) from err

    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of one array, decoded (into `out` when given, which must be C-contiguous
        and of that shape): the one way rows leave the store, so that a chunk that fails its
        checksum or does not decode is always a `StoreError` naming it (see `Damage`)."""
        array = self.array(name)
        with self.reading(name, start, stop):
            if out is None:
                return np.asarray(array[start:stop])
            array.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(out))
            return out

    @contextmanager
    def reading(self, name: str, start: int, stop: int) -> Iterator[None]:
        """Around a read of rows [start, stop) of `name` (for callers that hold the array):
        a chunk that does not decode becomes the `StoreError` that names it; a remote store that
        cannot be reached, a `StoreError` that says so (the rows are not known to be damaged)."""
        with remote_access(self.url, f"read rows {_span(range(start, stop))} of {name!r} from",
                           "the rows are not known to be damaged; rerun once the store can be reached"):
            try:
                yield
            except DECODE_ERRORS as err:
                if access_problem(self.url, err) is not None:  # out of reach, not damage
                    raise
                damaged = self._damage_error(name, start, stop)
                if damaged is None:  # every chunk decodes alone: the failure was not damage
                    raise
                raise damaged from err

    def _damage_error(self, name: str, start: int, stop: int) -> StoreError | None:
        """The StoreError for the first damaged chunk of rows [start, stop) of `name`, if any."""
        for chunk in self.chunks_of(name, start, stop):
            damage = self.chunk_damage(name, chunk)
            if damage is not None:
                return StoreError(f"store {self.url!r} is damaged: {damage.describe()}; "
                                  + repair_advice(self.url))
        return None

    def chunks_of(self, name: str, start: int, stop: int) -> range:
        """Chunks of `name` that hold rows [start, stop) (entries, for `shard_done`)."""
        size = 1 if name == SHARD_DONE else self.geometry.chunk_rows
        return range(start // size, max(start // size, -(-stop // size)))

    def chunk_damage(self, name: str, chunk: int) -> Damage | None:
        """Decode one chunk of `name` alone: None if it decodes, else what is wrong with it."""
        geometry = self.geometry
        shard = chunk if name == SHARD_DONE else chunk // geometry.chunks_per_shard
        rows = geometry.shard_rows_range(shard) if name == SHARD_DONE else geometry.chunk_rows_range(chunk)
        start, stop = (chunk, chunk + 1) if name == SHARD_DONE else (rows.start, rows.stop)
        try:
            self.array(name)[start:stop]
        except DECODE_ERRORS as err:
            if access_problem(self.url, err) is not None:  # not damage: the store is out of reach
                raise
            whole = None if name == SHARD_DONE else shard_file_problem(self.array(name), shard)
            return Damage(name, range(chunk, chunk + 1), rows, shard, whole or decode_failure(err))
        return None

    def require_complete(self) -> None:
        """Refuse to read a store whose harvest has not finished, or one of whose shard files is
        gone (Zarr would read the rows as fill values, zeros, without complaint)."""
        if not self.complete:
            done = int(self.attrs.get("n_tokens_complete", 0))
            raise StoreError(
                f"store {self.url!r} is incomplete ({done} of {self.n_tokens} tokens); rerun the "
                "same `saeworks harvest` command to resume it"
            )
        for name in (*self.hooks, *INDEX_ARRAYS):
            missing = self.missing_shard_files(name)
            if missing:
                rows = self.geometry.shard_rows_range(missing[0])
                raise StoreError(
                    f"store {self.url!r} is damaged: array {name!r} has no file for shard "
                    f"{missing[0]} (rows {_span(rows)})" + (f" and {len(missing) - 1} more" if
                                                             len(missing) > 1 else "")
                    + "; " + repair_advice(self.url))

    def missing_shard_files(self, name: str) -> list[int]:
        """Shards of a row array whose file does not exist (one existence check per shard; for a
        remote store one listing of the array's chunk prefix, ~1 request per 1,000 shards)."""
        array = self.array(name)
        if not array.shards:
            return []
        keys = [array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
                for shard in range(math.ceil(array.shape[0] / array.shards[0]))]
        if is_remote(self.url):
            with remote_access(self.url, f"list the shard objects of {name!r} in"):
                present = sync(_listed_keys(array))
            return [shard for shard, key in enumerate(keys) if key not in present]

        async def exists() -> list[bool]:
            return list(await asyncio.gather(*((array.store_path / key).exists() for key in keys)))

        return [shard for shard, found in enumerate(sync(exists())) if not found]

    def read_rows(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one hook as a tensor in the stored dtype `[rows, d]`."""
        return to_tensor(self.read(hook, start, stop), self.store_dtype)

    def shards_done(self) -> np.ndarray:
        """Boolean per shard: fully written."""
        return self.read(SHARD_DONE, 0, self.array(SHARD_DONE).shape[0]).astype(bool)

    def flag_objects(self) -> np.ndarray:
        """Boolean per shard: its done flag is stored (one listing of the flags' prefix, no reads;
        a damaged flag counts as stored). `shards_done` reads and checks them."""
        array = self.array(SHARD_DONE)
        with remote_access(self.url, "list the done flags of"):
            present = sync(_listed_keys(array))
        return np.asarray([array.metadata.encode_chunk_key((shard,)) in present
                           for shard in range(array.shape[0])], dtype=bool)


async def _listed_keys(array: zarr.Array) -> set[str]:
    """The chunk keys of `array` that its store lists (relative to the array, like `c/3/0`)."""
    root = array.store_path.path
    prefix = f"{root}/c/" if root else "c/"
    return {key[len(root) + 1:] if root else key
            async for key in array.store_path.store.list_prefix(prefix)}


def decode_failure(err: BaseException) -> str:
    """Why a chunk did not decode, from Zarr's exception, as a `Damage` reason."""
    message = " ".join(str(err).split())
    if isinstance(err, ValueError) and "checksum" in message:
        return "CRC32C checksum mismatch"
    return f"undecodable ({type(err).__name__}: {message[:200]})"


def shard_file_problem(array: zarr.Array, shard: int) -> str | None:
    """What is wrong with one shard file of a sharded row array as a whole (missing, or its index
    fails its CRC32C), as a `Damage` reason; None if nothing (or the array is not sharded)."""
    codec = array.metadata.codecs[0]  # type: ignore[union-attr]
    if not isinstance(codec, zarr.codecs.ShardingCodec) \
            or codec.index_location != zarr.codecs.ShardingCodecIndexLocation.end:
        return None
    chunks_per_shard = math.prod(s // c for s, c in zip(array.shards or (), array.chunks, strict=True))
    checked = any(isinstance(c, zarr.codecs.Crc32cCodec) for c in codec.index_codecs)
    size = 16 * chunks_per_shard + (4 if checked else 0)
    path = array.store_path / array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
    raw = sync(path.get(byte_range=SuffixByteRequest(size)))
    if raw is None:
        return "shard file missing (it would read as fill values)"
    index = raw.to_bytes()
    if len(index) < size:
        return f"shard file truncated ({len(index)} bytes)"
    if checked and google_crc32c.value(index[:-4]) != int.from_bytes(index[-4:], "little"):
        return "shard index CRC32C checksum mismatch"
    return None


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
                 extra_attrs: Mapping[str, Any], checksums: bool = True) -> ActivationStore:
    """Create an empty store (overwriting nothing: the caller checked there is none).
    `checksums=False` writes the format of stores made before chunk checksums (for tests and
    benchmarks only)."""
    with remote_access(url, "create"):
        return _create_store(url, identity, geometry, hook_dims, store_dtype, compression, extra_attrs,
                             checksums)


def _create_store(url: str, identity: Mapping[str, Any], geometry: StoreGeometry,
                  hook_dims: Mapping[str, int], store_dtype: str, compression: str,
                  extra_attrs: Mapping[str, Any], checksums: bool) -> ActivationStore:
    group = open_group(url, "w-")
    disk_dtype = "uint16" if store_dtype == "bfloat16" else store_dtype
    itemsize = np.dtype(disk_dtype).itemsize
    for hook, d in hook_dims.items():
        array = group.create_array(
            hook, shape=(geometry.n_tokens, d), dtype=disk_dtype,
            chunks=(geometry.chunk_rows, d), shards=(geometry.shard_rows, d),
            compressors=_chunk_codecs(_compressors(compression, itemsize), checksums), fill_value=0,
        )
        array.attrs["dtype"] = store_dtype
    for name in INDEX_ARRAYS:
        group.create_array(name, shape=(geometry.n_tokens,), dtype="int32",
                           chunks=(geometry.chunk_rows,), shards=(geometry.shard_rows,),
                           compressors=_chunk_codecs(zarr.codecs.ZstdCodec(level=3), checksums),
                           fill_value=-1)
    group.create_array(SHARD_DONE, shape=(geometry.n_shards,), dtype="uint8", chunks=(1,),
                       fill_value=0, compressors=_chunk_codecs(None, checksums))
    group.attrs.update({
        "saeworks_store_format": FORMAT_VERSION,
        "saeworks_version": package_version(),
        **({"chunk_checksums": CHECKSUM} if checksums else {}),
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
    with remote_access(store.url, f"write shard {shard} of", RESUME_ADVICE):
        _write_shard(store, shard, activations, token_ids)


def _write_shard(store: ActivationStore, shard: int, activations: Mapping[str, np.ndarray],
                 token_ids: np.ndarray) -> None:
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
    """Recompute `n_tokens_complete` from the shard flags and save it (rank 0 only). For a remote
    store the flags counted are the flag objects one listing finds (a set flag is an object, a
    cleared one is deleted: 0 is the fill value, which Zarr does not store), not each flag read:
    this runs after every shard, and reading thousands of flags costs two requests each."""
    geometry = store.geometry
    done = store.flag_objects() if is_remote(store.url) else store.shards_done()
    tokens = sum(len(geometry.shard_windows(s)) for s in np.flatnonzero(done).tolist())
    tokens *= geometry.context_size
    with remote_access(store.url, "record the progress of", RESUME_ADVICE):
        store.group.attrs["n_tokens_complete"] = int(tokens)
    return int(tokens)


def finalize(store: ActivationStore, n_windows: int) -> None:
    """Trim the arrays to the windows the dataset really had, then mark the store complete."""
    with remote_access(store.url, "finish", RESUME_ADVICE):
        _finalize(store, n_windows)


def _finalize(store: ActivationStore, n_windows: int) -> None:
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
