"""`dtype: auto`: concrete names pass through; on a CPU a probe decides, once per machine, and the
store records what it decided."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from saeworks.activations.store import ActivationStore
from saeworks.cli import main
from saeworks.run_config import RunConfig
from saeworks.sae import precision
from saeworks.sae.configio import ConfigError, load_config
from saeworks.sae.paths import cache_root
from saeworks.sae.precision import Timings, autocast_dtype, resolve_dtype
from tests.helpers import DEMO_CONFIG, small_harvest_overrides

CPU = torch.device("cpu")
BF16_FASTER = Timings(float32=0.010, bfloat16=0.005)
BF16_SLOWER = Timings(float32=0.010, bfloat16=0.015)
REAL_CACHE = cache_root()


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty saeworks cache and no decision remembered by this process."""
    monkeypatch.setenv("SAEWORKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_decided", {})
    return tmp_path / "cache" / precision.PRECISION_FILE


def probe_returning(monkeypatch: pytest.MonkeyPatch, timings: Timings) -> list[Timings]:
    """Make the probe return `timings`; the list returned grows by one per probe."""
    calls: list[Timings] = []

    def measure() -> Timings:
        calls.append(timings)
        return timings

    monkeypatch.setattr(precision, "measure_matmul", measure)
    return calls


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's decisions, as a later run would start without them."""
    monkeypatch.setattr(precision, "_decided", {})


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_concrete_dtypes_pass_through(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = probe_returning(monkeypatch, BF16_FASTER)
    assert resolve_dtype(name, CPU) == name
    assert calls == []


def test_autocast_names_pass_through_and_unknown_names_are_refused() -> None:
    assert autocast_dtype("none", CPU) == "none" and autocast_dtype("bfloat16", CPU) == "bfloat16"
    with pytest.raises(ValueError, match="'fast'"):
        resolve_dtype("fast", CPU)
    with pytest.raises(ValueError, match="'fast'"):
        autocast_dtype("fast", CPU)


@pytest.mark.parametrize(("timings", "dtype", "autocast"), [
    (BF16_FASTER, "bfloat16", "bfloat16"),
    (BF16_SLOWER, "float32", "none"),
    (Timings(float32=0.0105, bfloat16=0.010), "float32", "none"),  # 1.05x: within the margin
])
def test_auto_on_the_cpu_follows_the_probe(timings: Timings, dtype: str, autocast: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    probe_returning(monkeypatch, timings)
    assert resolve_dtype("auto", CPU) == dtype
    assert autocast_dtype("auto", CPU) == autocast


def test_auto_with_a_real_probe_picks_what_its_figures_imply(monkeypatch: pytest.MonkeyPatch,
                                                             fresh_cache: Path) -> None:
    measured: list[Timings] = []
    real = precision.measure_matmul

    def spy() -> Timings:
        measured.append(real())
        return measured[-1]

    monkeypatch.setattr(precision, "measure_matmul", spy)
    chosen = resolve_dtype("auto", "cpu")
    (timings,) = measured
    assert chosen == ("bfloat16" if timings.float32 > precision.MARGIN * timings.bfloat16 else "float32")
    (entry,) = json.loads(fresh_cache.read_text()).values()
    assert entry["dtype"] == chosen and entry["float32_gflops"] > 0 and entry["bfloat16_gflops"] > 0
    assert entry["machine"]["threads"] == torch.get_num_threads()


def test_the_decision_is_cached_on_disk(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path) -> None:
    calls = probe_returning(monkeypatch, BF16_FASTER)
    assert resolve_dtype("auto", CPU) == "bfloat16"
    assert resolve_dtype("auto", CPU) == "bfloat16"
    new_process(monkeypatch)
    probe_returning(monkeypatch, BF16_SLOWER)  # would now say float32, but is not asked
    assert resolve_dtype("auto", CPU) == "bfloat16"
    assert len(calls) == 1 and fresh_cache.is_file()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}', ""])
def test_an_unreadable_cache_is_probed_again_and_rewritten(content: str, monkeypatch: pytest.MonkeyPatch,
                                                           fresh_cache: Path) -> None:
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(content)
    calls = probe_returning(monkeypatch, BF16_SLOWER)
    assert resolve_dtype("auto", CPU) == "float32"
    assert len(calls) == 1
    entries = json.loads(fresh_cache.read_text())
    assert [entry["dtype"] for entry in entries.values() if isinstance(entry, dict) and "dtype" in entry] \
        == ["float32"]


def test_another_machine_does_not_reuse_the_entry(monkeypatch: pytest.MonkeyPatch, fresh_cache: Path) -> None:
    calls = probe_returning(monkeypatch, BF16_FASTER)
    assert resolve_dtype("auto", CPU) == "bfloat16"
    here: Callable[[], dict[str, object]] = precision.machine_key
    new_process(monkeypatch)
    monkeypatch.setattr(precision, "machine_key", lambda: {**here(), "cpu": "another CPU"})
    calls = probe_returning(monkeypatch, BF16_SLOWER)
    assert resolve_dtype("auto", CPU) == "float32"
    assert len(calls) == 1
    assert sorted(e["dtype"] for e in json.loads(fresh_cache.read_text()).values()) == ["bfloat16", "float32"]


def test_the_machine_key_names_cpu_torch_and_threads() -> None:
    key = precision.machine_key()
    assert key["torch"] == torch.__version__ and key["threads"] == torch.get_num_threads()
    assert set(key) >= {"cpu", "flags", "machine"}


@pytest.mark.parametrize(("native", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_gpu_is_bfloat16_where_native(native: bool, dtype: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = probe_returning(monkeypatch, BF16_SLOWER)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == dtype
    assert calls == []  # no CPU probe for a GPU


def test_config_accepts_auto_and_refuses_unknown_dtypes_naming_the_field() -> None:
    cfg = load_config(RunConfig, None, ["model.dtype=auto", "train.autocast=auto"])
    assert cfg.model.dtype == "auto" and cfg.train.autocast == "auto"
    with pytest.raises(ConfigError, match=r"model\.dtype: 'fast' is not one of"):
        load_config(RunConfig, None, ["model.dtype=fast"])
    with pytest.raises(ConfigError, match=r"train\.autocast: 'fast' is not one of"):
        load_config(RunConfig, None, ["train.autocast=fast"])


def test_the_demo_config_asks_for_auto() -> None:
    cfg = load_config(RunConfig, DEMO_CONFIG)
    assert cfg.model.dtype == "auto" and cfg.train.autocast == "auto"


@pytest.mark.slow
def test_a_harvest_with_auto_records_and_resumes_under_the_resolved_dtype(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store identity holds the dtype `auto` became, and a rerun under that concrete dtype (or
    under `auto` again) finds the same identity and changes nothing."""
    calls = probe_returning(monkeypatch, BF16_FASTER)
    monkeypatch.setenv("SAEWORKS_CACHE", str(REAL_CACHE))  # its converted embedded model, and
    monkeypatch.setattr(precision, "cache_file", lambda: tmp_path / "precision.json")  # not there
    tiny = {"harvest.max_tokens": 128, "model.dtype": "auto"}
    assert main(["harvest", str(DEMO_CONFIG), *small_harvest_overrides(tmp_path, **tiny)]) == 0
    store = ActivationStore.open(str(tmp_path / "activations.zarr"))
    assert store.complete and store.attrs["identity"]["model"]["dtype"] == "bfloat16"
    before = store.read_rows("blocks.2.hook_resid_post", 0, 128)
    for dtype in ("bfloat16", "auto"):
        overrides = small_harvest_overrides(tmp_path, **{**tiny, "model.dtype": dtype})
        assert main(["harvest", str(DEMO_CONFIG), *overrides]) == 0
    after = ActivationStore.open(str(tmp_path / "activations.zarr"))
    assert after.attrs["identity"] == store.attrs["identity"]
    assert after.read_rows("blocks.2.hook_resid_post", 0, 128).equal(before)
    assert len(calls) == 1
