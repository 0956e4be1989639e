"""Learning rate over training: linear warm-up, then constant or cosine decay, per optimizer step.

The schedule is a function of the optimizer step alone, ``lr(t)`` for t in [0, T] steps with T = epochs × steps per
epoch and W = the warm-up steps:

    t <= W:  lr(t) = lr · t / W                                         (linear warm-up from 0)
    t >= W:  "constant": lr(t) = lr
             "cosine":   lr(t) = lr · (r + (1 - r) · (1 + cos(π (t - W) / (T - W))) / 2),  r = min_lr_ratio

so lr(W) = lr, the cosine midpoint is lr · (1 + r) / 2 and lr(T) = lr · r. Optimizer step s (0-based) uses lr(s + 1),
the value at the end of that step: the first step already moves the weights (lr / W) and the last one uses lr · r.

Since the learning rate is derived from the step number, a run resumed after epoch e (step e × steps per epoch)
continues with exactly the learning rates of the uninterrupted run; nothing beyond the epoch count is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from genrec.config import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    """lr(t) over ``total_steps`` optimizer steps (see the module docstring)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"  # "constant" | "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {self.kind!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warm-up of {self.warmup_steps} steps does not fit in {self.total_steps} steps")

    @classmethod
    def from_config(cls, tc, steps_per_epoch: int) -> LRSchedule:
        """The schedule of a ``TrainConfig`` with ``steps_per_epoch`` optimizer steps per epoch."""
        check_schedule_config(tc)
        total = tc.epochs * steps_per_epoch
        warmup = 0
        if tc.warmup_epochs > 0:  # at least one step, so a short warm-up never becomes none
            warmup = min(total, max(1, round(tc.warmup_epochs * steps_per_epoch)))
        return cls(tc.lr, total, warmup, tc.lr_schedule, tc.min_lr_ratio)

    @property
    def is_constant(self) -> bool:
        """True when every step uses ``lr`` (no warm-up, constant schedule)."""
        return self.kind == "constant" and self.warmup_steps == 0

    def at(self, t: float) -> float:
        """lr(t) for t in [0, total_steps] (clamped to that range)."""
        t = min(max(t, 0.0), float(self.total_steps))
        if self.warmup_steps > 0 and t < self.warmup_steps:
            return self.lr * t / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return self.lr
        cosine = 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup_steps) / span))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def for_step(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): lr(step + 1)."""
        return self.at(step + 1)


def check_schedule_config(tc) -> None:
    """Raise ``ConfigError`` for a schedule that cannot be followed: a warm-up longer than the training."""
    if tc.warmup_epochs > tc.epochs:
        raise ConfigError(
            f"train.warmup_epochs: {tc.warmup_epochs:g} is longer than train.epochs={tc.epochs}: the learning rate "
            f"would never reach train.lr. Use a warm-up of at most train.epochs (usually a few percent of it)"
        )
