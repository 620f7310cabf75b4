"""Native CPU kernels: C sources in sae/kernels/, built on first use with the machine's C compiler
and loaded with ctypes.

Why C: torch has no fused "add a bias, then take each row's top k" on the CPU, and the three ops it
takes instead (add, block maxima, gathers) read the 151 MB pre-activations of a training batch
several times. Why built here rather than shipped: `-march=native` vectorises for the CPU at hand,
and a plain C file without torch headers compiles in well under a second.

The library goes under the cache ($SAEWORKS_CACHE/kernels), named by a hash of the source (and
the headers beside it), the compiler, its flags and this CPU's model and flags (a cache shared by
different machines never loads a library built for another CPU). Without a compiler, or when the
build fails, a warning says so once and callers use torch ops (the same results, slower).
SAEWORKS_NATIVE=0 turns the kernels off. Kernels run on torch's OpenMP threads (kernels/team.h).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from saeworks.sae.paths import cache_root

KERNELS_DIR = Path(__file__).parent / "kernels"
BASE_FLAGS = ("-O3", "-std=c11", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC")
"""-fno-math-errno: sqrtf vectorises (no kernel reads errno)."""
NATIVE_FLAGS = ("-march=native",)
"""Vectorise for this CPU; some ARM toolchains refuse it."""
OPENMP_FLAGS = ("-fopenmp",)
"""Run a kernel's threads as an OpenMP team: torch's own (sae/kernels/team.h); a compiler without
OpenMP (clang without libomp) builds kernels that run on one thread."""
FLAG_SETS = (BASE_FLAGS + NATIVE_FLAGS + OPENMP_FLAGS, BASE_FLAGS + OPENMP_FLAGS,
             BASE_FLAGS + NATIVE_FLAGS, BASE_FLAGS)
"""Tried in this order until one builds."""

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
SIGNATURES: dict[str, list[Any]] = {  # the last argument of each but sort_by_latent: the number of threads
    "bias_top_k_f32": [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64],
    "bias_top_k_bf16": [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64],
    "encoder_copies": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64],
    "refined_top_k": [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR,
                      _I64],
    "sort_by_latent": [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "sparse_lookup": [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64],
    "sparse_window_lookup": [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR,
                             _I64],
    "sparse_row_dots": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I64],
    "sparse_outer": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I64],
    "topk_backward": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                      _PTR, _PTR, _PTR, _I64],
    "decode_error": [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64],
    "row_squares": [_PTR, _PTR, _I64, _I64, _I64, _PTR, _I64],
    "adam_rows": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                  ctypes.c_double, ctypes.c_double, ctypes.c_double, _I64, _I64],
    "logit_scores": [_PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64],
}

_lock = threading.Lock()
_libraries: dict[Path, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False when SAEWORKS_NATIVE is 0/false/no/off."""
    return os.environ.get("SAEWORKS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def library(name: str, directory: Path = KERNELS_DIR,
            signatures: dict[str, list[Any]] | None = None) -> ctypes.CDLL | None:
    """The built library of <directory>/<name>.c (default sae/kernels; built at the first call in
    this process and cached on disk), or None where native kernels are off or cannot be built here.
    `signatures`: argument types of its functions (default SIGNATURES); each returns an int64."""
    if not enabled():
        return None
    source = directory / f"{name}.c"
    with _lock:
        if source not in _libraries:
            _libraries[source] = _build_and_load(source, SIGNATURES if signatures is None else signatures)
        return _libraries[source]


def compiler() -> str | None:
    """$CC, else the compiler Python was built with, else `cc`; None if none is on PATH."""
    configured = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "").split(" ")[0] or "cc"
    return shutil.which(configured) or (shutil.which("cc") if not os.environ.get("CC") else None)


def _build_and_load(source: Path, signatures: dict[str, list[Any]]) -> ctypes.CDLL | None:
    name = source.stem
    cc = compiler()
    if cc is None:
        _warn(name, f"no C compiler found (set CC, or install gcc/clang; looked for "
                    f"{os.environ.get('CC') or 'the one Python was built with, then cc'})")
        return None
    errors: list[str] = []
    for flags in FLAG_SETS:
        lib = _load_or_build(cc, flags, source, _library_path(source, cc, flags), errors)
        if lib is None:
            continue
        for function, argtypes in signatures.items():
            if hasattr(lib, function):
                getattr(lib, function).argtypes = argtypes
                getattr(lib, function).restype = _I64
        if OPENMP_FLAGS[0] not in flags:
            warnings.warn(f"saeworks: the native kernel {name} was built without OpenMP and runs on "
                          f"one thread ({'; '.join(errors)[-300:]})", RuntimeWarning, stacklevel=3)
        return lib
    _warn(name, "; ".join(errors))
    return None


def _load_or_build(cc: str, flags: tuple[str, ...], source: Path, path: Path,
                   errors: list[str]) -> ctypes.CDLL | None:
    """The library at `path`, built first where it is missing; one that does not load (a damaged
    cache entry) is removed and built once more. Failures are appended to `errors`."""
    for attempt in range(2):
        if not path.exists():
            error = _compile(cc, flags, source, path)
            if error:
                errors.append(error)
                return None
        try:
            return ctypes.CDLL(str(path))
        except OSError as exc:
            path.unlink(missing_ok=True)
            if attempt:
                errors.append(f"{path}: {exc}")
    return None


def _library_path(source: Path, cc: str, flags: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, cc.encode(), " ".join(flags).encode(),
                 _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_root() / "kernels" / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def _cpu_identity() -> str:
    """The CPU model and instruction-set flags (Linux), else what `platform` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in text.splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep))


def _compile(cc: str, flags: tuple[str, ...], source: Path, path: Path) -> str | None:
    """Build `source` into `path` (through a temporary file and a rename, so that a killed build
    or two ranks building at once never leave a partial library); an error message, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, str(source), "-o", partial],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return f"{cc} {' '.join(flags)} failed: {result.stderr.strip()[-500:]}"
        os.replace(partial, path)
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cc} {' '.join(flags)}: {exc}"
    finally:
        Path(partial).unlink(missing_ok=True)


def _warn(name: str, why: str) -> None:
    warnings.warn(f"saeworks: the native kernel {name} is not available ({why}); using torch ops "
                  "instead (same results, slower). SAEWORKS_NATIVE=0 silences this.",
                  RuntimeWarning, stacklevel=3)
