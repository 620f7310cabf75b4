"""Checksums end to end: a flipped byte in a store is a one-line error on every read, `saeworks
verify` lists it, and `saeworks harvest --repair` recomputes exactly the damaged shards, ending
with the uninterrupted store bit for bit. Stores written before checksums still open."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from saeworks.activations.config import ReaderConfig
from saeworks.activations.reader import ActivationReader
from saeworks.activations.rows import RowSelection, iter_kept_rows
from saeworks.activations.store import (
    ActivationStore,
    StoreError,
    StoreGeometry,
    StoreMetadataError,
    create_store,
    finalize,
    write_shard,
)
from saeworks.activations.verify import repair_store, verify_store
from saeworks.cli import main
from tests.helpers import DEMO_CONFIG, REPO, run_cli, shards_printed, small_harvest_overrides
from tests.train_helpers import make_store, train_overrides

HOOK = "blocks.2.hook_resid_post"
ARRAYS = [HOOK, "token_ids", "window", "position"]
# small_harvest_overrides: 16 windows of 64 tokens, 2 windows per chunk, 2 chunks per shard:
CHUNK_ROWS, SHARDS = 128, 4


def overrides(run_dir: Path, **extra: object) -> list[str]:
    return small_harvest_overrides(run_dir, **{"harvest.hooks": f"[{HOOK}]", **extra})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted harvest of the embedded model: 4 shards of 2 chunks, one hook."""
    run_dir = tmp_path_factory.mktemp("pristine")
    assert main(["harvest", str(DEMO_CONFIG), *overrides(run_dir)]) == 0
    return run_dir / "activations.zarr"


def shard_file(store: Path, array: str, shard: int) -> Path:
    """The file of one shard of an array (of one done flag for `shard_done`)."""
    return store / array / "c" / (str(shard) if array in (*ARRAYS[1:], "shard_done") else f"{shard}/0")


def flip(path: Path, offset: int = 40) -> None:
    """XOR one byte of a file (by default inside the first chunk's compressed bytes)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def damaged_copy(pristine: Path, run_dir: Path, *pieces: tuple[str, int]) -> Path:
    """A copy of the pristine store under `run_dir` with one byte flipped in each (array, shard)."""
    store = run_dir / "activations.zarr"
    shutil.copytree(pristine, store)
    for array, shard in pieces:
        flip(shard_file(store, array, shard), 0 if array == "shard_done" else 40)
    return store


def decoded(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][:]) for name in [*ARRAYS, "shard_done"]}


def chunk_files(store: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every chunk file of the row arrays."""
    return {str(p.relative_to(store)): (p.read_bytes(), p.stat().st_mtime_ns)
            for name in ARRAYS for p in sorted((store / name / "c").rglob("*")) if p.is_file()}


def assert_one_line_naming(message: str, array: str, chunk: int, shard: int) -> None:
    rows = f"rows {chunk * CHUNK_ROWS}-{(chunk + 1) * CHUNK_ROWS - 1}"
    assert "\n" not in message
    assert f"array {array!r} chunk {chunk} ({rows}, shard {shard}): CRC32C checksum mismatch" in message
    assert "saeworks verify" in message and "--repair" in message


def test_flipped_byte_in_a_hook_chunk_fails_every_read(pristine: Path, tmp_path: Path) -> None:
    store = ActivationStore.open(str(damaged_copy(pristine, tmp_path, (HOOK, 1))))
    assert store.chunk_checksums
    reader = ActivationReader(store, HOOK, ReaderConfig(batch_size=64, buffer_chunks=2), epochs=1)
    with pytest.raises(StoreError) as raised:  # raised in the loading thread, re-raised here
        list(reader)
    assert_one_line_naming(str(raised.value), HOOK, 2, 1)
    with pytest.raises(StoreError) as raised:
        store.read_rows(HOOK, 0, store.n_tokens)
    assert_one_line_naming(str(raised.value), HOOK, 2, 1)
    with pytest.raises(StoreError, match="chunk 2 "):
        list(iter_kept_rows(store, HOOK, RowSelection.of_store(store), batch_rows=100))
    assert store.read_rows(HOOK, 0, 2 * CHUNK_ROWS).shape == (256, 576)  # undamaged rows still read


def test_flipped_byte_in_token_ids_fails_the_reader(pristine: Path, tmp_path: Path) -> None:
    store = ActivationStore.open(str(damaged_copy(pristine, tmp_path, ("token_ids", 3))))
    with pytest.raises(StoreError) as raised:  # the reader counts kept rows from the token ids
        ActivationReader(store, HOOK, ReaderConfig(batch_size=64, buffer_chunks=2))
    assert_one_line_naming(str(raised.value), "token_ids", 6, 3)


def test_training_on_a_damaged_store_exits_with_one_line(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "synthetic.zarr"
    make_store(store, n_windows=64)
    flip(store / "blocks.0.hook_resid_post" / "c" / "1" / "0")
    assert main(["train", *train_overrides(tmp_path / "run", store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "saeworks train: error: store" in err and "array 'blocks.0.hook_resid_post' chunk 4" in err
    assert not list((tmp_path / "run").glob("saes/*/sae_weights.safetensors"))


def test_verify_lists_the_damaged_chunks(pristine: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(pristine)]) == 0
    assert "ok: " in capsys.readouterr().out
    store = damaged_copy(pristine, tmp_path, (HOOK, 1), ("token_ids", 3))
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: array {HOOK!r} chunk 2 (rows 256-383, shard 1): CRC32C checksum mismatch" in out
    assert "damaged: array 'token_ids' chunk 6 (rows 768-895, shard 3): CRC32C checksum mismatch" in out
    assert "2 shard(s) [1, 3]" in out and "saeworks harvest CONFIG --repair" in out
    process = subprocess.run([sys.executable, "-m", "saeworks", "verify", str(store)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 1, process.stderr
    assert f"damaged: array {HOOK!r} chunk 2 (rows 256-383, shard 1)" in process.stdout
    assert main(["verify", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "saeworks verify: error: no activation store" in err


def test_repair_recomputes_exactly_the_damaged_shards(pristine: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = damaged_copy(pristine, tmp_path, (HOOK, 1), ("token_ids", 3))
    before = chunk_files(store)
    assert main(["harvest", str(DEMO_CONFIG), *overrides(tmp_path), "--repair"]) == 0
    assert shards_printed(capsys.readouterr().out) == {"rank 0/1": [1, 3]}
    assert ActivationStore.open(str(store)).complete
    wanted, got = decoded(pristine), decoded(store)
    for name in wanted:
        np.testing.assert_array_equal(got[name], wanted[name], err_msg=name)
    after = chunk_files(store)
    assert after.keys() == before.keys() == chunk_files(pristine).keys()
    for name, (data, mtime) in after.items():
        assert data == (pristine / name).read_bytes(), f"{name}: not the uninterrupted bytes"
        rewritten = name.endswith(("c/1/0", "c/3/0", "c/1", "c/3"))
        assert (mtime != before[name][1]) == rewritten, f"{name}: rewritten={rewritten} expected"
    assert verify_store(str(store), progress=False).ok
    # Nothing damaged: --repair says so and writes nothing.
    caplog.set_level("INFO", logger="saeworks")
    assert main(["harvest", str(DEMO_CONFIG), *overrides(tmp_path), "--repair"]) == 0
    assert "repair: no damage found" in caplog.text
    assert chunk_files(store) == after


def test_repair_of_a_trimmed_store_rewrites_its_short_last_shard(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A dataset shorter than the budget leaves a store trimmed to 6 windows (shard 1 holds 2)."""
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"text": "' + "The quick brown fox jumps over the lazy dog. " * 40 + '"}\n')
    settings = {"data.path": data, "harvest.max_tokens": 100_000}
    assert main(["harvest", str(DEMO_CONFIG), *overrides(tmp_path / "a", **settings)]) == 0
    pristine = tmp_path / "a" / "activations.zarr"
    store = damaged_copy(pristine, tmp_path / "b", (HOOK, 1))
    capsys.readouterr()
    assert main(["harvest", str(DEMO_CONFIG), *overrides(tmp_path / "b", **settings), "--repair"]) == 0
    assert shards_printed(capsys.readouterr().out) == {"rank 0/1": [1]}
    assert ActivationStore.open(str(store)).n_tokens == 6 * 64
    for name, (data_bytes, _) in chunk_files(store).items():
        assert data_bytes == (pristine / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_repair_gives_the_uninterrupted_store(pristine: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: rank 0 clears the damaged shards' flags before the barrier,
    each rank recomputes its own of them (shard s belongs to rank s % 2)."""
    store = damaged_copy(pristine, tmp_path, (HOOK, 1), ("token_ids", 2), ("shard_done", 3))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = run_cli([str(DEMO_CONFIG), *overrides(tmp_path), "--repair"], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shards_printed(result.stdout) == {"rank 0/2": [2], "rank 1/2": [1, 3]}
    for name, (data, _) in chunk_files(store).items():
        assert data == (pristine / name).read_bytes(), name
    wanted, got = decoded(pristine), decoded(store)
    for name in wanted:
        np.testing.assert_array_equal(got[name], wanted[name], err_msg=name)


def synthetic(path: Path, checksums: bool = True) -> ActivationStore:
    """A complete float16 store of 16 windows of 8 tokens, 2 per chunk, 2 chunks per shard."""
    geometry = StoreGeometry.plan(16, 8, chunk_tokens=16, chunks_per_shard=2)
    store = create_store(str(path), {"test": "integrity"}, geometry, {"h": 64}, "float16", "zstd",
                         {"tokenizer": {"vocab_size": 1000}}, checksums=checksums)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((geometry.n_tokens, 64)) * 20).astype(np.float16)
    token_ids = rng.integers(0, 1000, (16, 8), dtype=np.int32)
    for shard in range(geometry.n_shards):
        windows = geometry.shard_windows(shard)
        write_shard(store, shard, {"h": values[windows.start * 8:windows.stop * 8]},
                    token_ids[windows.start:windows.stop])
    finalize(store, 16)
    return ActivationStore.open(str(path))


def test_a_byte_flip_that_old_stores_decode_silently_is_now_caught(tmp_path: Path) -> None:
    """Old stores (no chunk CRC32C) decode some flipped bytes into changed values without error;
    the same flip in a store with checksums is a StoreError."""
    old, new = synthetic(tmp_path / "old.zarr", checksums=False), synthetic(tmp_path / "new.zarr")
    assert new.chunk_checksums and not old.chunk_checksums
    expected = old.read_rows("h", 0, 16).numpy().copy()
    file = tmp_path / "old.zarr" / "h" / "c" / "0" / "0"
    original = file.read_bytes()
    for offset in range(64, 128):  # inside chunk 0's compressed bytes (the shard's first)
        flip(file, offset)
        try:
            changed = int((old.read_rows("h", 0, 16).numpy() != expected).sum())
        except StoreError:
            changed = 0
        file.write_bytes(original)
        if changed:
            break
    assert changed, "a flip that decodes silently into changed values"
    flip(tmp_path / "new.zarr" / "h" / "c" / "0" / "0", offset)
    with pytest.raises(StoreError, match=r"array 'h' chunk 0 \(rows 0-15, shard 0\): CRC32C"):
        new.read_rows("h", 0, 16)


def test_old_stores_open_read_and_verify_without_checksums(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = synthetic(tmp_path / "old.zarr", checksums=False)
    assert not store.chunk_checksums
    assert store.read_rows("h", 0, store.n_tokens).shape == (128, 64)
    assert main(["verify", str(tmp_path / "old.zarr")]) == 0
    out = capsys.readouterr().out
    assert "carries no chunk checksums" in out and "ok: " in out
    flip(tmp_path / "old.zarr" / "window" / "c" / "1", -3)  # inside the shard index's CRC32C
    assert main(["verify", str(tmp_path / "old.zarr")]) == 1
    assert "array 'window' chunks 2-3 (rows 32-63, shard 1): shard index CRC32C checksum mismatch" \
        in capsys.readouterr().out


def test_damaged_flags_are_repairable_and_metadata_is_not(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = synthetic(tmp_path / "s.zarr")
    flip(tmp_path / "s.zarr" / "shard_done" / "c" / "2", 0)
    report = verify_store(store.url, progress=False)
    assert [d.describe() for d in report.damage] == \
        ["the done flag of shard 2 (rows 64-95): CRC32C checksum mismatch"]
    writable = ActivationStore.open(store.url, mode="r+")
    assert repair_store(writable, progress=False).damaged_shards == [2]
    reopened = ActivationStore.open(store.url)
    assert not reopened.complete and reopened.shards_done().tolist() == [True, True, False, True]
    assert reopened.attrs["n_tokens_complete"] == 96  # what a resume then finishes
    incomplete = verify_store(store.url, progress=False)
    assert incomplete.ok and incomplete.shards_checked == 3
    assert any(line.startswith("incomplete: 96 of 128 tokens") for line in incomplete.lines())

    (tmp_path / "s.zarr" / "h" / "zarr.json").write_text("{damaged")
    assert main(["verify", store.url]) == 1
    assert "unrepairable: store" in capsys.readouterr().out
    with pytest.raises(StoreMetadataError, match="cannot be repaired in place"):
        repair_store(ActivationStore.open(store.url, mode="r+"), progress=False)
    metadata = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(metadata)[:-20])
    with pytest.raises(StoreMetadataError, match=r"its zarr\.json is damaged"):
        ActivationStore.open(store.url)


def test_a_missing_shard_file_is_refused_not_read_as_zeros(tmp_path: Path) -> None:
    """Zarr reads the rows of a shard whose file is gone as fill values (zeros) without error."""
    store = synthetic(tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "h" / "c" / "1" / "0").unlink()
    assert not ActivationStore.open(store.url).read_rows("h", 32, 64).float().abs().sum()
    with pytest.raises(StoreError, match=r"array 'h' has no file for shard 1 \(rows 32-63\); run "
                                         r"`saeworks verify"):
        ActivationReader(ActivationStore.open(store.url), "h", ReaderConfig(batch_size=8))
    with pytest.raises(StoreError, match="has no file for shard 1"):
        list(iter_kept_rows(ActivationStore.open(store.url), "h",
                            RowSelection.of_store(ActivationStore.open(store.url)), batch_rows=8))
    assert not verify_store(store.url, progress=False).ok
    assert repair_store(ActivationStore.open(store.url, mode="r+"), progress=False).damaged_shards == [1]
