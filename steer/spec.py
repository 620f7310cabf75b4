"""Interventions written as text, as the command line and the Python API take them.

    1931=+2              additive, 2 × the feature's max activation (the default method's value)
    1931=-4              additive, negative
    55=clamp:0           clamp the feature's activation to 0 (zero-ablation, error kept)
    55=clamp:0.5         clamp to half its max activation
    12=projection_cap:1  cap the projection at what the feature adds at its max activation
    12=orthogonal:0      remove the feature's direction
    7=zero | 7=mean | 7=resample
                         ablations (resample needs the other input: --resample-from)
    vec.safetensors@blocks.15.hook_resid_post=+8          a raw vector (its only tensor)
    vec.safetensors:diff@blocks.15.hook_resid_post=orthogonal:0   the tensor named `diff`
"""

from __future__ import annotations

import re

import torch

from saeworks.steer.interventions import (
    METHODS,
    FeatureIntervention,
    FeatureSource,
    InterventionError,
    VectorIntervention,
    check_method,
)
from saeworks.steer.positions import Positions

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_VALUE = re.compile(rf"^(?:(?P<method>[a-z_]+)(?::(?P<coef>{_NUMBER}))?|(?P<bare>{_NUMBER}))$")
NO_VALUE = ("zero", "mean", "resample")
"""Methods that take no coefficient."""


def _method_and_coefficient(text: str, spec: str, default_method: str) -> tuple[str, float]:
    match = _VALUE.match(text.strip())
    if match is None:
        raise InterventionError(f"cannot read {spec!r}: after '=' give a number (+2), METHOD:VALUE "
                                "(clamp:0) or an ablation (zero, mean, resample); methods: "
                                f"{', '.join(METHODS)}")
    if match["bare"] is not None:
        method = check_method(default_method)
        if method in NO_VALUE:
            raise InterventionError(f"{spec!r}: method {method} takes no value")
        return method, float(match["bare"])
    method = check_method(match["method"])
    if method in NO_VALUE:
        if match["coef"] is not None:
            raise InterventionError(f"{spec!r}: {method} ablation takes no value; write "
                                    f"{spec.split('=')[0]}={method}")
        return method, 0.0
    if match["coef"] is None:
        example = 0 if method == "clamp" else 1
        raise InterventionError(f"{spec!r}: {method} needs a value, e.g. {method}:{example}")
    return method, float(match["coef"])


def parse_feature(spec: str, source: FeatureSource, *, default_method: str = "additive",
                  positions: Positions | None = None, raw: bool = False,
                  resample_from: torch.Tensor | None = None) -> FeatureIntervention:
    """`ID=VALUE` on `source` (see the module docstring)."""
    feature_text, sep, value = spec.partition("=")
    if not sep:
        raise InterventionError(f"cannot read {spec!r}: write FEATURE=VALUE, e.g. 1931=+2 or 55=clamp:0")
    try:
        feature = int(feature_text.strip())
    except ValueError:
        raise InterventionError(f"cannot read {spec!r}: {feature_text.strip()!r} is not a feature "
                                "id") from None
    method, coefficient = _method_and_coefficient(value, spec, default_method)
    if method == "resample" and resample_from is None:
        raise InterventionError(f"{spec!r}: resample ablation needs the other input (--resample-from TEXT)")
    return FeatureIntervention(source, feature, method, coefficient, raw=raw,
                               positions=positions or Positions(),
                               resample_from=resample_from if method == "resample" else None)


def parse_vector(spec: str, *, default_method: str = "additive",
                 positions: Positions | None = None) -> VectorIntervention:
    """`FILE[:KEY]@HOOK=VALUE`: a raw vector from a safetensors file."""
    target, sep, value = spec.rpartition("=")
    path_part, at, hook = target.rpartition("@")
    if not sep or not at or not hook or not path_part:
        raise InterventionError(f"cannot read {spec!r}: write FILE[:TENSOR]@HOOK=VALUE, e.g. "
                                "v.safetensors@blocks.15.hook_resid_post=+4")
    path, key = path_part, None
    if ":" in path_part and not path_part.endswith(":") and not re.match(r"^[A-Za-z]:[\\/]", path_part):
        path, _, key = path_part.rpartition(":")
    method, coefficient = _method_and_coefficient(value, spec, default_method)
    if method not in ("additive", "projection_cap", "orthogonal"):
        raise InterventionError(f"{spec!r}: a raw vector takes additive, projection_cap or orthogonal, "
                                f"not {method}")
    return VectorIntervention.from_file(path, hook, key, method=method, coefficient=coefficient,
                                        positions=positions or Positions())
