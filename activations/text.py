"""Text in, token windows out: load a dataset through `datasets`, tokenise, pack.

Documents are read as a stream (local files and hub datasets alike, so memory stays bounded),
shuffled with a seed, tokenised in batches, joined with the model's EOS (BOS when it has none),
and cut into windows of `context_size` tokens that each start with BOS. The same config always
gives the same windows, which is what lets a killed harvest resume and processes split the work.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np

from saeworks.activations.config import DataConfig
from saeworks.activations.corpus import embedded_corpus
from saeworks.sae.errors import SaeworksError

EMBEDDED = "embedded"
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
             ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_TOKENIZE_BATCH = 64
"""Most documents tokenised per call. Batches start at one document and double up to this, so a
reader that needs a few windows (evaluate's held-out ones, a short harvest) tokenises about
what it uses, not 64 whole documents; the ids are the same whatever the batching."""


class DataError(SaeworksError, ValueError):
    """A dataset that is missing, empty, or lacks the configured text field."""


def local_files(path: str) -> list[str] | None:
    """The data files a local path names (file, directory or glob); None if it is not local."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = sorted(str(p) for p in Path(expanded).rglob("*") if p.suffix in _BUILDERS)
        if not files:
            raise DataError(f"data.path: directory {path!r} holds no {'/'.join(_BUILDERS)} files")
        return files
    if os.path.isfile(expanded):
        return [expanded]
    if glob.has_magic(expanded):
        files = sorted(glob.glob(expanded, recursive=True))
        if not files:
            raise DataError(f"data.path: no file matches {path!r}")
        return files
    if path.startswith((".", "/", "~")) or Path(path).suffix in _BUILDERS:
        raise DataError(
            f"data.path: no such file or directory {path!r}; give a local text/jsonl/parquet "
            "file, a directory or glob of them, a hub dataset name, or `embedded`"
        )
    return None


def _open_stream(cfg: DataConfig) -> Any:
    import datasets

    path = str(embedded_corpus()) if cfg.path == EMBEDDED else cfg.path
    files = local_files(path)
    if files is not None and all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"data.path: {cfg.path!r} is empty (yielded no text); point it at a "
                        "non-empty dataset")
    try:
        if files is None:  # a hub dataset, streamed
            stream = datasets.load_dataset(path, cfg.name, split=cfg.split, streaming=True)
        else:
            builders = {_BUILDERS.get(Path(f).suffix, "") for f in files}
            if len(builders) != 1 or "" in builders:
                raise DataError(f"data.path: {path!r} mixes or holds unsupported file types: {files[:5]}")
            builder = builders.pop()
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            # Local files: no "download count" request to S3, which datasets sends for its own
            # json/text/... builders unless offline (a DNS wait on a machine without network).
            with patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False):
                stream = datasets.load_dataset(builder, data_files={cfg.split: files},
                                               split=cfg.split, streaming=True, **kwargs)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for a missing hub name or bad split
        raise DataError(f"data.path: cannot load dataset {cfg.path!r} (split {cfg.split!r}): "
                        f"{type(err).__name__}: {err}") from err
    if cfg.shuffle_seed is not None:
        stream = stream.shuffle(seed=cfg.shuffle_seed, buffer_size=cfg.shuffle_buffer)
    return stream


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a hash of its text, so the split is the
    same whatever the order, the shuffle seed or the process that reads it."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def iter_documents(cfg: DataConfig, held_out: bool = False) -> Iterator[str]:
    """The dataset's texts in the configured order (non-string and empty texts skipped): the
    training split by default, or only the held-out documents (`data.holdout_fraction`)."""
    if held_out and cfg.holdout_fraction == 0:
        raise DataError("data.holdout_fraction is 0, so there are no held-out documents to evaluate "
                        "on; set it (e.g. 0.05) and harvest again, or evaluate on a store")
    for row in _open_stream(cfg):
        if cfg.text_field not in row:
            raise DataError(
                f"data.text_field: dataset {cfg.path!r} has no field {cfg.text_field!r}; its fields "
                f"are {', '.join(row)}"
            )
        text = row[cfg.text_field]
        if isinstance(text, str) and text and is_held_out(text, cfg.holdout_fraction) == held_out:
            yield text


def separator_ids(tokenizer: Any) -> tuple[int, int]:
    """(BOS that opens each window, token that separates documents)."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None and bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to separate documents")
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


def excluded_token_ids(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Token ids whose rows training skips (the tokenizer's special tokens, when configured)."""
    return sorted(set(tokenizer.all_special_ids)) if cfg.exclude_special_tokens else []


def pack_windows(token_lists: Iterable[list[int]], context_size: int, bos: int | None,
                 separator: int, keep_tail: bool = False) -> Iterator[np.ndarray]:
    """Join token lists with `separator` and cut windows `[context_size]` (int32), BOS first if given.
    With `keep_tail`, the tokens left over at the end (less their final separator) make one shorter
    last window; otherwise they are dropped."""
    body = context_size - (bos is not None)
    pending: list[int] = []
    for tokens in token_lists:
        pending.extend(tokens)
        pending.append(separator)
        while len(pending) >= body:
            window = pending[:body] if bos is None else [bos, *pending[:body]]
            del pending[:body]
            yield np.asarray(window, dtype=np.int32)
    if keep_tail and len(pending) > 1:  # pending ends with the last document's separator
        yield np.asarray(pending[:-1] if bos is None else [bos, *pending[:-1]], dtype=np.int32)


def _tokenized(texts: Iterator[str], tokenizer: Any) -> Iterator[list[int]]:
    size = 1
    while batch := list(islice(texts, size)):
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
        size = min(2 * size, _TOKENIZE_BATCH)


def iter_windows(tokenizer: Any, cfg: DataConfig, max_windows: int, held_out: bool = False
                 ) -> Iterator[np.ndarray]:
    """At most `max_windows` token windows `[context_size]` of the configured text (of its
    training documents, or of its held-out ones)."""
    bos, separator = separator_ids(tokenizer)
    tokens = _tokenized(iter_documents(cfg, held_out), tokenizer)
    windows = pack_windows(tokens, cfg.context_size, bos if cfg.prepend_bos else None, separator)
    return islice(windows, max_windows)
