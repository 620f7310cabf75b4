"""The installed saeworks version, recorded in every artifact and cache key."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """Version of the installed `saeworks` distribution ("0+unknown" when run from a bare tree)."""
    try:
        return version("saeworks")
    except PackageNotFoundError:
        return "0+unknown"
