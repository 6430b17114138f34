"""Errors a user can cause. `train.py` prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

from data.shards import DataError
from data.tokenizer import TokenizerError
from models import ModelConfigError
from optim.hybrid import RoutingError


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem and what would be valid."""

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        """The error listing `problems`, one per line."""
        return cls("invalid configuration:\n  - " + "\n  - ".join(problems))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (corrupt, or of a different run)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; training stopped before the update."""


USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, DataError, TokenizerError, ModelConfigError, RoutingError)
