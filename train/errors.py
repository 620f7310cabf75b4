"""The expected ways a training run ends early, each with a message that says what to do."""

from __future__ import annotations

from saeworks.sae.errors import SaeworksError


class TrainingDivergedError(SaeworksError, RuntimeError):
    """A loss or weight became NaN/Inf: the run stops, and no SAE is saved from it."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived: a checkpoint was written at the next step boundary, then the run stopped."""


class CheckpointError(SaeworksError, ValueError):
    """A checkpoint that cannot be resumed (another config) or would be overwritten without resume."""
