"""Learning-rate schedules in tokens: a multiplier on every group's peak lr.

Fractions are of the token budget D. With τ the tokens seen at the *end* of a step (so the last
step of the budget has τ = D), W = warmup·D and Δ = decay·D:

    warmup (all kinds)   τ ≤ W:   f = τ / W
    constant             f = 1
    cosine               f = r + (1 − r) · ½ (1 + cos(π (τ − W) / (D − W)))
    linear               f = 1 − (1 − r) (τ − W) / (D − W)
    wsd                  f = 1 for τ ≤ D − Δ, then 1 − (1 − r) (τ − (D − Δ)) / Δ   (warmup-stable-decay)

where r = min_lr_ratio. Cosine, linear and wsd end exactly at r·lr on the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "cosine", "linear", "wsd")


@dataclass(frozen=True)
class Schedule:
    kind: str = "cosine"
    warmup: float = 0.0  # fraction of the budget
    decay: float = 0.2  # fraction of the budget (wsd only)
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; valid: {list(KINDS)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"schedule.warmup={self.warmup} must be a fraction of the budget in [0, 1)")
        if self.kind == "wsd" and not 0.0 < self.decay <= 1.0 - self.warmup:
            raise ValueError(f"schedule.decay={self.decay} must be in (0, 1 - warmup] for wsd")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")

    def factor(self, tokens: float, budget: float) -> float:
        """The lr multiplier for the step that ends at `tokens` of a `budget`-token run."""
        tokens, warmup = min(tokens, budget), self.warmup * budget
        if tokens <= warmup:
            return tokens / warmup
        r = self.min_lr_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_start = budget - self.decay * budget
            return 1.0 if tokens <= decay_start else 1.0 - (1.0 - r) * (tokens - decay_start) / (budget - decay_start)
        progress = (tokens - warmup) / (budget - warmup)
        if self.kind == "cosine":
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - r) * progress  # linear
