"""Stores in S3: harvest, kill and resume, verify, repair, train, evaluate and analyze on `s3://`
store URLs, against a real S3-compatible server (moto in server mode, a separate process) that
these tests start on 127.0.0.1 and stop at teardown. The endpoint and dummy credentials are given
the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so s3fs, boto and our code run
unmodified; nothing of ours is mocked.

Every S3 result is compared with the same work on a local directory: the harvested objects are the
local store's files byte for byte, and training, evaluation and analysis give the same SAE, figures
and features."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 's3fs>=2026.9'): "
                                          "the S3 store tests need it")
pytest.importorskip("moto.server", reason="moto's server is not installed (pip install "
                                          "'moto[server]>=5.2'): the S3 store tests start it")

from saeworks.activations.config import ReaderConfig  # noqa: E402
from saeworks.activations.reader import ActivationReader  # noqa: E402
from saeworks.activations.store import (  # noqa: E402
    ActivationStore,
    StoreError,
    StoreGeometry,
    create_store,
    finalize,
    record_progress,
    write_shard,
)
from saeworks.activations.verify import verify_store  # noqa: E402
from saeworks.cli import main  # noqa: E402
from saeworks.eval.dictionary import FeatureDictionary  # noqa: E402
from tests.helpers import DEMO_CONFIG, REPO, shards_printed  # noqa: E402

BUCKET = "saeworks-test"
HOOK = "blocks.3.hook_resid_post"
CONTEXT, WINDOWS, WINDOWS_PER_SHARD = 32, 96, 8
N_SHARDS = WINDOWS // WINDOWS_PER_SHARD  # 12 shards of one 256-row chunk each


class S3Server:
    """The moto server on loopback, and a client of it that never caches listings."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                                    use_listings_cache=False)

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under `prefix` (a key path in the bucket), by its key relative to it."""
        keys = self.fs.find(f"{BUCKET}/{prefix}")
        return {key[len(f"{BUCKET}/{prefix}/"):]: self.fs.cat_file(key) for key in keys}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m moto.server` on a free loopback port, once it answers: (process, endpoint)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise RuntimeError(f"moto did not start on {endpoint}: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto in server mode on a free loopback port, the AWS_* environment pointing at it (for this
    process and the CLI processes it starts), and one empty bucket."""
    home = tmp_path_factory.mktemp("moto")
    server, endpoint = start_moto(home / "moto.log")
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                         "https_proxy", "ALL_PROXY", "all_proxy"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", "saeworks-test")
            env.setenv("AWS_SECRET_ACCESS_KEY", "saeworks-test")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))  # no user profile applies
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
            env.setenv("NO_PROXY", "127.0.0.1,localhost")
            s3fs.S3FileSystem.clear_instance_cache()
            client = S3Server(endpoint)
            client.fs.mkdir(BUCKET)
            yield client
    finally:
        stop(server)
        s3fs.S3FileSystem.clear_instance_cache()  # instances bound to the stopped server's endpoint


def harvest_overrides(run_dir: Path, store: str | None = None, **extra: object) -> list[str]:
    """A tiny harvest of the embedded model: 96 windows of 32 tokens at layer 3, float32, one
    256-row chunk per shard (12 shards). Batch size 1 everywhere: slow enough for a kill to land
    mid-harvest, and a CPU forward need not be batch-size invariant (see test_harvest.py), so
    every store here is made alike."""
    settings: dict[str, object] = {
        "run_dir": run_dir,
        "model.device": "cpu",
        "model.dtype": "float32",
        "data.context_size": CONTEXT,
        "harvest.hooks": f"[{HOOK}]",
        "harvest.max_tokens": WINDOWS * CONTEXT,
        "harvest.batch_size": 1,
        "harvest.chunk_tokens": WINDOWS_PER_SHARD * CONTEXT,
        "harvest.chunks_per_shard": 1,
        "harvest.store_dtype": "float32",
        **({"harvest.store": store} if store else {}),
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def local_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the tiny harvest, uninterrupted, into a local directory."""
    run_dir = tmp_path_factory.mktemp("local")
    assert main(["harvest", str(DEMO_CONFIG), *harvest_overrides(run_dir)]) == 0
    return run_dir / "activations.zarr"


@pytest.fixture(scope="module")
def s3_store(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same harvest into s3://BUCKET/harvest.zarr (its run_dir stays local: nothing goes there)."""
    url = f"s3://{BUCKET}/harvest.zarr"
    assert main(["harvest", str(DEMO_CONFIG),
                 *harvest_overrides(tmp_path_factory.mktemp("s3-run"), url)]) == 0
    return url


def test_harvest_into_s3_writes_the_local_store_byte_for_byte(s3: S3Server, s3_store: str,
                                                              local_store: Path) -> None:
    """Every object of the S3 store is the file of the local store at the same path (chunks,
    shard indexes with their CRC32Cs, metadata); nothing else is left in the bucket's prefix (the
    writability probe is gone)."""
    objects, files = s3.objects("harvest.zarr"), local_files(local_store)
    assert len(files) == 6 + 4 * N_SHARDS + N_SHARDS  # zarr.json x6, 4 sharded row arrays, flags
    assert objects.keys() == files.keys()
    assert [key for key in objects if objects[key] != files[key]] == []
    store = ActivationStore.open(s3_store)
    assert store.complete and store.n_tokens == WINDOWS * CONTEXT and store.shards_done().all()
    np.testing.assert_array_equal(store.read(HOOK, 0, store.n_tokens),
                                  ActivationStore.open(str(local_store)).read(HOOK, 0, store.n_tokens))


def test_the_reader_yields_the_local_batches_from_s3(s3_store: str, local_store: Path) -> None:
    """Two epochs of shuffled batches, rank 1 of 2, and a restored position: the same rows."""
    cfg = ReaderConfig(batch_size=64, buffer_chunks=3, seed=5)

    def batches(url: str) -> list[tuple[np.ndarray, np.ndarray]]:
        reader = ActivationReader(ActivationStore.open(url), HOOK, cfg, rank=1, world_size=2, epochs=2)
        first = [(b.activations.numpy(), b.rows.numpy()) for b in reader]
        reader.load_state_dict({**reader.state_dict(), "epoch": 1, "rows_in_epoch": 128})
        return first + [(b.activations.numpy(), b.rows.numpy()) for b in reader]

    remote, local = batches(s3_store), batches(str(local_store))
    assert len(remote) == len(local) > 8
    for (a, rows_a), (b, rows_b) in zip(remote, local, strict=True):
        np.testing.assert_array_equal(rows_a, rows_b)
        np.testing.assert_array_equal(a, b)


def test_verify_on_s3_in_a_fresh_process(s3_store: str) -> None:
    """`saeworks verify s3://...` as a user runs it: the endpoint comes from the environment."""
    result = subprocess.run([sys.executable, "-m", "saeworks", "verify", s3_store], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ok: {s3_store}: no damage found in {N_SHARDS} of {N_SHARDS} shards" in result.stdout


def train_overrides(run_dir: Path, store: str) -> list[str]:
    return [f"run_dir={run_dir}", f"train.store={store}", "train.saes=[{k: 8, d_sae: 256}]",
            f"train.total_tokens={256 * 30}", "train.batch_size=256", "train.lr=3e-3",
            "train.init_sample_rows=512", "train.wandb=false", "train.device=cpu",
            "train.reader.buffer_chunks=3", "train.log_every_steps=10", "train.seed=3"]


def evaluate_overrides() -> list[str]:
    return ["evaluate.device=cpu", f"evaluate.held_out_tokens={2 * CONTEXT}", "evaluate.batch_size=2",
            "analyze.device=cpu", "analyze.batch_size=512", "analyze.top_n=4", "analyze.bands=2",
            "analyze.samples_per_band=2", "analyze.context_before=4", "analyze.context_after=2",
            "analyze.max_tokens=2048"]


def _metrics(sae_dir: Path) -> dict[str, Any]:
    """metrics.json without what names the SAE and store or times the run."""
    metrics = json.loads((sae_dir / "metrics.json").read_text())
    info = {key: value for key, value in metrics["info"].items()
            if key not in ("sae_dir", "target", "seconds", "tokens_per_s")}
    return {**metrics, "info": info}


@pytest.mark.slow
def test_train_evaluate_and_analyze_on_s3_give_the_local_results(s3_store: str, local_store: Path,
                                                                   tmp_path: Path) -> None:
    """`train.store=s3://...`, `saeworks evaluate SAE s3://...` and `saeworks analyze SAE s3://...`:
    the same SAE weights, the same figures and the same features as on the local store."""
    from safetensors.torch import load_file

    saes = {}
    for name, url in (("s3", s3_store), ("local", str(local_store))):
        assert main(["train", *train_overrides(tmp_path / name, url)]) == 0
        saes[name] = tmp_path / name / "saes" / "topk-k8-256"
        assert main(["evaluate", str(saes[name]), url, *evaluate_overrides()]) == 0
        assert main(["analyze", str(saes[name]), url, *evaluate_overrides(),
                     "--out", str(tmp_path / name / "dictionary")]) == 0
    weights = {name: load_file(str(sae / "sae_weights.safetensors")) for name, sae in saes.items()}
    assert weights["s3"].keys() == weights["local"].keys()
    for key in weights["s3"]:
        torch.testing.assert_close(weights["s3"][key], weights["local"][key], rtol=0, atol=0)
    target = json.loads((saes["s3"] / "metrics.json").read_text())["info"]["target"]
    assert target["kind"] == "store" and target["url"] == s3_store and target["n_windows"] == 2
    remote_metrics, local_metrics = _metrics(saes["s3"]), _metrics(saes["local"])
    assert remote_metrics == local_metrics and remote_metrics["metrics"]["ce_spliced"] > 0
    with FeatureDictionary.open(tmp_path / "s3" / "dictionary", readonly=True) as remote, \
            FeatureDictionary.open(tmp_path / "local" / "dictionary", readonly=True) as local:
        assert remote.info["store"] == s3_store
        for key, values in local.statistics().items():
            np.testing.assert_array_equal(remote.statistics()[key], values, err_msg=key)
        live = [i for i in range(256) if not local.feature(i).dead]
        assert len(live) > 50
        for i in live:
            assert remote.feature(i).top_contexts == local.feature(i).top_contexts


def _flip(s3: S3Server, key: str, offset: int) -> None:
    data = bytearray(s3.fs.cat_file(key))
    data[offset] ^= 0x10
    s3.fs.pipe_file(key, bytes(data))


@pytest.mark.slow
def test_damage_in_s3_is_found_verified_and_repaired(s3: S3Server, s3_store: str, local_store: Path,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A flipped byte in a hook shard object, a flipped byte in a token_ids object and a deleted
    shard object: reads refuse with the one line naming them, `verify` lists all three, and
    `harvest --repair` recomputes exactly those shards, ending with the local store's bytes."""
    url = f"s3://{BUCKET}/damaged.zarr"
    s3.fs.copy(f"{BUCKET}/harvest.zarr", f"{BUCKET}/damaged.zarr", recursive=True)
    _flip(s3, f"{BUCKET}/damaged.zarr/{HOOK}/c/2/0", 40)
    reader = ActivationReader(ActivationStore.open(url), HOOK, ReaderConfig(batch_size=64, buffer_chunks=4),
                              epochs=1)
    with pytest.raises(StoreError, match=rf"array '{HOOK}' chunk 2 \(rows 512-767, shard 2\): CRC32C"):
        list(reader)  # raised in a fetch thread of the reader's loader, re-raised here
    _flip(s3, f"{BUCKET}/damaged.zarr/token_ids/c/5", 20)
    s3.fs.rm_file(f"{BUCKET}/damaged.zarr/{HOOK}/c/9/0")

    store = ActivationStore.open(url)
    with pytest.raises(StoreError, match=r"array 'blocks.3.hook_resid_post' has no file for shard 9 "
                                         r"\(rows 2304-2559\); run `saeworks verify s3://"):
        store.require_complete()
    with pytest.raises(StoreError, match=rf"store '{url}' is damaged: array '{HOOK}' chunk 2 \(rows "
                                         r"512-767, shard 2\): CRC32C checksum mismatch"):
        store.read_rows(HOOK, 0, store.n_tokens)

    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"damaged: array '{HOOK}' chunk 2 (rows 512-767, shard 2): CRC32C checksum mismatch" in out
    assert "damaged: array 'token_ids' chunk 5 (rows 1280-1535, shard 5): CRC32C checksum mismatch" in out
    assert f"damaged: array '{HOOK}' chunk 9 (rows 2304-2559, shard 9): shard file missing" in out
    assert "3 shard(s) [2, 5, 9]" in out

    assert main(["harvest", str(DEMO_CONFIG), *harvest_overrides(tmp_path, url), "--repair"]) == 0
    assert shards_printed(capsys.readouterr().out) == {"rank 0/1": [2, 5, 9]}
    objects, files = s3.objects("damaged.zarr"), local_files(local_store)
    assert objects.keys() == files.keys()
    assert [key for key in objects if objects[key] != files[key]] == []
    assert verify_store(url, progress=False).ok


@pytest.mark.slow
def test_sigkill_then_resume_into_s3_gives_the_uninterrupted_store(s3: S3Server, local_store: Path,
                                                                   tmp_path: Path) -> None:
    """`kill -9` of a harvest into S3 once 3 shards are flagged, wherever its writes then are;
    rerunning the same command redoes only the unfinished shards and ends with exactly the objects
    of an uninterrupted harvest."""
    url = f"s3://{BUCKET}/killed.zarr"
    command = [sys.executable, "-m", "saeworks", "harvest", str(DEMO_CONFIG),
               *harvest_overrides(tmp_path, url)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = f"{BUCKET}/killed.zarr/shard_done/c"
    deadline = time.monotonic() + 300
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if s3.fs.exists(flags) and len(s3.fs.ls(flags, refresh=True)) >= 3:
                break
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL, as `kill -9` (nothing if it already ended)
        process.wait()
    killed = ActivationStore.open(url)
    done = int(killed.shards_done().sum())
    assert 3 <= done < N_SHARDS, "the kill must land mid-harvest"
    assert not killed.complete
    with pytest.raises(StoreError, match="incomplete"):
        ActivationReader(killed, HOOK, ReaderConfig(batch_size=64))

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rewritten = shards_printed(resumed.stdout)["rank 0/1"]
    assert len(rewritten) == N_SHARDS - done and not set(rewritten) & set(range(done))
    objects, files = s3.objects("killed.zarr"), local_files(local_store)
    assert objects.keys() == files.keys()
    assert [key for key in objects if objects[key] != files[key]] == []


def synthetic(url: str, n_windows: int = 16, written: int = 16) -> ActivationStore:
    """A float16 store of `n_windows` windows of 8 tokens (2 per chunk, 2 chunks per shard) with
    the first `written` windows written and the store finalized to them."""
    geometry = StoreGeometry.plan(n_windows, 8, chunk_tokens=16, chunks_per_shard=2)
    store = create_store(url, {"test": "s3"}, geometry, {"h": 8}, "float16", "zstd",
                         {"tokenizer": {"vocab_size": 100}})
    rng = np.random.default_rng(0)
    values = rng.standard_normal((written * 8, 8)).astype(np.float16)
    token_ids = rng.integers(0, 100, (written, 8), dtype=np.int32)
    for shard in range(-(-written // geometry.windows_per_shard)):
        planned = geometry.shard_windows(shard)
        windows = range(planned.start, min(planned.stop, written))
        write_shard(store, shard, {"h": values[windows.start * 8:windows.stop * 8]},
                    token_ids[windows.start:windows.stop])
    finalize(store, written)
    return ActivationStore.open(url)


def test_flags_another_writer_sets_are_seen_not_read_from_a_cached_listing(s3: S3Server) -> None:
    """The ranks of a harvest are separate processes: rank 0 lists the flags (its progress count)
    while rank 1 writes its own. A flag written after that listing must still read as set (a
    listing cache answered it as missing, and a 2-process harvest into S3 then failed at
    finalize with "some shards were never written")."""
    url = f"s3://{BUCKET}/flags.zarr"
    geometry = StoreGeometry.plan(16, 8, chunk_tokens=16, chunks_per_shard=2)
    store = create_store(url, {"test": "s3"}, geometry, {"h": 8}, "float16", "zstd", {})
    write_shard(store, 0, {"h": np.ones((32, 8), np.float16)}, np.ones((4, 8), np.int32))
    store = ActivationStore.open(url, mode="r+")
    assert record_progress(store) == 32 and store.shards_done().tolist() == [True, False, False, False]
    flag = s3.fs.cat_file(f"{BUCKET}/flags.zarr/shard_done/c/0")
    s3.fs.pipe_file(f"{BUCKET}/flags.zarr/shard_done/c/2", flag)  # another process sets shard 2's flag
    assert store.shards_done().tolist() == [True, False, True, False]
    assert record_progress(store) == 64
    assert ActivationStore.open(url).attrs["n_tokens_complete"] == 64


def test_a_trimmed_store_in_s3_drops_the_objects_past_its_end(s3: S3Server) -> None:
    """A dataset shorter than the budget: finalize trims the arrays, and the shard objects past
    the last window go from the bucket (they would otherwise be orphans a listing counts)."""
    url = f"s3://{BUCKET}/trimmed.zarr"
    store = synthetic(url, n_windows=16, written=6)  # 4 shards planned, 2 written (the 2nd half full)
    assert store.complete and store.n_tokens == 48 and store.geometry.n_shards == 2
    assert sorted(k for k in s3.objects("trimmed.zarr") if k.startswith("h/c/")) == ["h/c/0/0", "h/c/1/0"]
    store.require_complete()
    assert verify_store(url, progress=False).ok
    assert store.read_rows("h", 0, 48).shape == (48, 8)


def test_an_unwritable_s3_store_is_one_line_before_the_model_loads(s3: S3Server, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]
                                                                   ) -> None:
    """No such bucket: the harvest stops at its writability check (the model is never loaded,
    so nothing is logged about it), exit 2, one line naming the URL and the setting."""
    url = "s3://no-such-bucket/x.zarr"
    assert main(["harvest", str(DEMO_CONFIG), *harvest_overrides(tmp_path, url)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"saeworks harvest: error: run_dir (or harvest.store): cannot write to {url}: " in err
    assert "bucket does not exist" in err
    assert main(["verify", url]) == 2
    assert f"no activation store at '{url}'" in capsys.readouterr().err


def test_an_unreachable_endpoint_is_one_line_not_damage(s3: S3Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A second server holds a store; it is stopped while a reader is open on the store. Reading
    (in the reader's thread) and opening then say the endpoint cannot be reached, and never call
    the rows damaged; the CLI prints one line, exit 2."""
    server, endpoint = start_moto(tmp_path / "moto.log")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries (s3fs still retries)
        s3fs.S3FileSystem.clear_instance_cache()  # new clients read the new endpoint
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("doomed")
        url = "s3://doomed/s.zarr"
        reader = ActivationReader(synthetic(url), "h", ReaderConfig(batch_size=16, buffer_chunks=2))
    finally:
        stop(server)
    try:
        with pytest.raises(StoreError) as raised:
            next(iter(reader))
        message = str(raised.value)
        assert message.startswith("cannot read rows ") and f"of 'h' from store '{url}': cannot reach " \
            "the storage endpoint" in message and "the rows are not known to be damaged" in message
        assert "\n" not in message and "is damaged" not in message and "checksum" not in message
        with pytest.raises(StoreError, match=rf"cannot open store '{url}': cannot reach the storage "
                                             "endpoint .*AWS_ENDPOINT_URL"):
            ActivationStore.open(url)
        result = subprocess.run([sys.executable, "-m", "saeworks", "verify", url], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith(f"saeworks verify: error: cannot open store '{url}': cannot reach")
        assert result.stderr.count("\n") == 1, result.stderr  # nothing else: no traceback, no noise
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
