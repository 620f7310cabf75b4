"""Text loading and packing: local formats through `datasets`, BOS/EOS joins, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saeworks.activations.config import DataConfig
from saeworks.activations.text import (
    DataError,
    excluded_token_ids,
    iter_documents,
    iter_windows,
    pack_windows,
)

DOCS = [f"Document number {i} talks about topic {i * 7} at some length." for i in range(12)]


def write_formats(tmp_path: Path) -> dict[str, Path]:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS}), parquet)
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, doc in enumerate(DOCS):
        (text_dir / f"{i:02d}.txt").write_text(doc + "\nSecond line.\n")
    return {"jsonl": jsonl, "parquet": parquet, "text": text_dir}


def test_pack_windows_joins_documents_and_opens_each_window_with_bos() -> None:
    windows = list(pack_windows([[10, 11, 12], [20, 21], [30, 31, 32, 33]], 4, bos=1, separator=2))
    assert [w.tolist() for w in windows] == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 31], [1, 32, 33, 2]]
    no_bos = list(pack_windows([[10, 11, 12], [20]], 3, bos=None, separator=2))
    assert [w.tolist() for w in no_bos] == [[10, 11, 12], [2, 20, 2]]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text"])
def test_every_local_format_yields_every_document(tmp_path: Path, fmt: str) -> None:
    path = write_formats(tmp_path)[fmt]
    texts = list(iter_documents(DataConfig(path=str(path), shuffle_seed=None)))
    assert len(texts) == len(DOCS)  # a text file is one document, not one per line
    expected = [d + "\nSecond line.\n" for d in DOCS] if fmt == "text" else DOCS
    assert sorted(texts) == sorted(expected)


def test_windows_are_deterministic_for_a_seed(tmp_path: Path, embedded_tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = str(write_formats(tmp_path)["jsonl"])
    def windows(seed: int | None) -> list[list[int]]:
        cfg = DataConfig(path=path, context_size=16, shuffle_seed=seed)
        return [w.tolist() for w in iter_windows(embedded_tokenizer, cfg, 100)]
    assert windows(3) == windows(3)
    assert windows(3) != windows(4)
    first = windows(None)
    assert all(w[0] == embedded_tokenizer.bos_token_id for w in first)
    text = embedded_tokenizer.decode(np.concatenate([w[1:] for w in first]))
    assert text.startswith(DOCS[0] + "<|im_end|>" + DOCS[1])  # documents joined by EOS, in order


def test_special_tokens_are_excluded_by_default(embedded_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert excluded_token_ids(embedded_tokenizer, DataConfig()) == [0, 1, 2]
    assert excluded_token_ids(embedded_tokenizer, DataConfig(exclude_special_tokens=False)) == []


def test_missing_text_field_lists_the_fields(tmp_path: Path) -> None:
    path = write_formats(tmp_path)["jsonl"]
    with pytest.raises(DataError, match="has no field 'body'; its fields are text, id"):
        next(iter_documents(DataConfig(path=str(path), text_field="body")))


def test_directory_of_unsupported_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="holds no"):
        next(iter_documents(DataConfig(path=str(tmp_path))))


def test_local_files_are_read_without_any_network_lookup(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets sends a "download count" request to S3 for its json/text builders unless told
    not to; on a machine without network that is a DNS wait on every load of a local file."""
    import socket

    looked_up: list[str] = []

    def no_network(host: str, *args: object, **kwargs: object) -> None:
        looked_up.append(host)
        raise OSError(f"no network in this test (asked for {host})")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one local document"}) + "\n")
    assert list(iter_documents(DataConfig(path=str(path)), held_out=False)) == ["one local document"]
    assert looked_up == []
