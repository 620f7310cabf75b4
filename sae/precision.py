"""`dtype: auto`: the fastest safe dtype of this machine, measured once and remembered.

On a GPU, `auto` means bfloat16 where the GPU supports it, else float32 (float16 is never chosen by
itself: the residual stream of some models overflows it). On a CPU, bfloat16 pays only where the
CPU multiplies bf16 matrices quickly: with AMX it is ~2x float32, with `avx512_bf16` alone it
ranges from slower than float32 (0.7x measured) to faster (2.4x) depending on the CPU, and without either
it is emulated. So the CPU is asked: a short probe times one matmul of a model-sized shape in both
dtypes with the current torch thread count (~50-150 ms), and the answer is cached in
`<saeworks cache>/precision.json`, keyed by the CPU (model name, a hash of its flags), the
architecture, the torch version and the thread count, so later runs do not probe again. A cache
file that cannot be read is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Literal, NamedTuple, cast

import torch

from saeworks.sae.atomic import write_text_atomic
from saeworks.sae.paths import cache_root

DtypeName = Literal["float32", "bfloat16", "float16"]
AutocastName = Literal["none", "bfloat16"]
CONCRETE: tuple[DtypeName, ...] = ("float32", "bfloat16", "float16")
PRECISION_FILE = "precision.json"
PROBE_VERSION = 1
"""Part of the cache key: raise it when the probe changes, so old decisions are measured again."""
PROBE_SHAPE = (512, 576, 2304)
"""(rows, d_in, d_out): 512 token rows through a 576 -> 2304 projection (SmolLM2-135M's width, an
MLP-sized output); 1.4 GFLOP, a few ms per matmul, big enough to reach the kernels' full speed."""
WARMUP, REPEATS = 2, 3
MARGIN = 1.1
"""bf16 must beat float32 by this factor to be chosen: the probe is one shape on a possibly busy
machine, a model's forward also runs norms, softmax and dtype conversions that gain less than its
matmuls, and bf16 rounds the activations to 8 mantissa bits; a tie is not worth that."""

log = logging.getLogger(__name__)
_decided: dict[str, DtypeName] = {}
"""This process's decisions by machine key, so one run never sees two answers."""


class Timings(NamedTuple):
    """Best seconds of one probe matmul in each dtype."""

    float32: float
    bfloat16: float


def resolve_dtype(name: str, device: torch.device | str) -> DtypeName:
    """The concrete dtype name `name` means on `device`: `auto` resolved, the others unchanged."""
    if name in CONCRETE:
        return cast(DtypeName, name)
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}: expected auto or one of {', '.join(CONCRETE)}")
    device = torch.device(device)
    if device.type == "cuda":  # the current device: each rank's own once the run has started
        # Native bf16 only (compute capability 8+, ROCm): older GPUs emulate it, slower than float32.
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    if device.type != "cpu":  # mps, xpu, ...: not measured here, so the safe choice
        return "float32"
    return _cpu_choice()


def autocast_dtype(name: str, device: torch.device | str) -> AutocastName:
    """`train.autocast` on `device`: `auto` is bfloat16 where `resolve_dtype('auto')` picks it."""
    if name in ("none", "bfloat16"):
        return cast(AutocastName, name)
    if name != "auto":
        raise ValueError(f"unknown autocast {name!r}: expected none, bfloat16 or auto")
    return "bfloat16" if resolve_dtype("auto", device) == "bfloat16" else "none"


def cache_file() -> Path:
    """Where the decisions are kept (under $SAEWORKS_CACHE when set)."""
    return cache_root() / PRECISION_FILE


def machine_key() -> dict[str, object]:
    """What decides the probe's answer: the CPU, the architecture, torch and the thread count."""
    info = _cpuinfo()
    flags = info.get("flags") or info.get("Features") or ""  # x86 / ARM
    return {"cpu": info.get("model name") or info.get("CPU part") or platform.processor(),
            "flags": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16],
            "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "probe": PROBE_VERSION}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def measure_matmul() -> Timings:
    """Best-of-REPEATS seconds of the probe matmul in float32 and bfloat16, interleaved so that a
    burst of load from other processes hits both."""
    rows, d_in, d_out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, d_in, generator=generator)  # [rows, d_in]
    b = torch.randn(d_in, d_out, generator=generator)  # [d_in, d_out]
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.no_grad():
        for i in range(WARMUP + REPEATS):
            for dtype, (x, w) in pairs.items():
                start = time.perf_counter()
                torch.mm(x, w)
                if i >= WARMUP:
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    return Timings(best[torch.float32], best[torch.bfloat16])


def _cpu_choice() -> DtypeName:
    key_fields = machine_key()
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    if key in _decided:
        return _decided[key]
    entries = _read_cache()
    entry = entries.get(key)
    choice = entry.get("dtype") if isinstance(entry, dict) else None
    if choice not in ("float32", "bfloat16"):
        timings = measure_matmul()
        choice = "bfloat16" if timings.float32 > MARGIN * timings.bfloat16 else "float32"
        flop = 2 * PROBE_SHAPE[0] * PROBE_SHAPE[1] * PROBE_SHAPE[2]
        figures = {"float32_gflops": round(flop / timings.float32 / 1e9, 1),
                   "bfloat16_gflops": round(flop / timings.bfloat16 / 1e9, 1)}
        log.info("dtype auto on this CPU: %s (probe matmul %dx%dx%d, %d threads: float32 %.1f "
                 "GFLOP/s, bfloat16 %.1f GFLOP/s; bf16 needs %.1fx); cached in %s", choice,
                 *PROBE_SHAPE, key_fields["threads"], figures["float32_gflops"],
                 figures["bfloat16_gflops"], MARGIN, cache_file())
        entries[key] = {"dtype": choice, **figures, "machine": key_fields}
        _write_cache(entries)
    _decided[key] = cast(DtypeName, choice)
    return _decided[key]


def _read_cache() -> dict[str, object]:
    """The cached decisions, or {} when the file is missing, unreadable or not what we wrote."""
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(entries: dict[str, object]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(entries, indent=2, sort_keys=True))
    except OSError as err:  # a read-only cache costs a probe per process, nothing else
        log.warning("cannot cache the dtype decision in %s: %s", path, err)
