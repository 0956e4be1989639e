"""A seeded synthetic conversion stream with known conversion probabilities and known delay distributions.

Delayed-feedback methods are judged against truths a real log never gives: the probability that an impression
eventually converts and how long the conversion takes. This generator draws a click stream whose every example
carries both, so a method's calibration and ranking can be compared with the best achievable.

Model (all draws from ``numpy.random.default_rng(seed)``; the same config and seed give the same stream):

* Click times: ``num_events`` times uniform over ``[0, days)`` (in seconds), sorted.
* Users: uniform over ``1..num_users``; contexts (a per-impression categorical, e.g. a placement): uniform over
  ``1..num_contexts``.
* Items churn: the catalogue holds ``items_alive`` items at any time, each alive for ``item_lifetime_days``; an
  impression at time ``t`` shows an item whose age is uniform in ``[0, lifetime)``, i.e. the item launched at
  ``t - age``, and items are numbered by launch slot (spacing ``lifetime / items_alive``), ids ``1..num_items``. So
  a model that stops learning falls behind: new items keep arriving, and only fresh labels describe them.
* True conversion probability (eventual conversion, at any delay), logistic in the feature effects::

      p(x) = sigmoid(b + u[user] + v[item] + k[context]),   u ~ N(0, su²), v ~ N(0, sv²), k ~ N(0, sk²)

  with the intercept ``b`` solved (bisection) so the mean of ``p`` over the drawn events is ``base_rate``.
* Delay of a conversion: a mixture of a fast exponential (mean ``fast_mean_h``), a medium exponential (mean
  ``medium_mean_h``) and a log-normal tail (median ``tail_median_h``, log-sd ``tail_sigma``). Half of the items are
  "slow" (flag drawn per item): their mixture weights are ``slow_weights``, the others' ``fast_weights``. With the
  defaults about 52% of conversions land within 1 h, 81% within 24 h and 96% within 72 h (:meth:`DelayModel.cdf`
  gives the exact shares); the delay depends on the item, so labelling pending conversions as negatives
  under-predicts slow items more than fast ones (it hurts ranking, not only calibration).

The probability that an example is labelled positive for a window ``w`` (converted within ``w`` of the click) is
``p(x) · F_item(w)``, :meth:`ConversionStream.window_prob`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["NEVER", "ConversionStream", "DelayModel", "SyntheticStreamConfig", "generate_conversion_stream"]

NEVER = np.iinfo(np.int64).max  # conversion time of an example that never converts (v <= t and v - c <= w never hold)
HOUR = 3600
DAY = 86400


@dataclass(frozen=True)
class DelayModel:
    """Delay of a conversion after its click: a three-component mixture whose weights depend on the item's flag."""

    fast_mean_h: float = 0.25  # exponential component 1 (mean, hours)
    medium_mean_h: float = 6.0  # exponential component 2
    tail_median_h: float = 30.0  # log-normal component 3 (median, hours)
    tail_sigma: float = 0.8  # log-normal component 3 (sd of log delay)
    fast_weights: tuple[float, float, float] = (0.7, 0.15, 0.15)  # mixture weights of "fast" items
    slow_weights: tuple[float, float, float] = (0.3, 0.25, 0.45)  # mixture weights of "slow" items

    def __post_init__(self) -> None:
        if min(self.fast_mean_h, self.medium_mean_h, self.tail_median_h, self.tail_sigma) <= 0:
            raise ValueError("DelayModel: means, median and sigma must be > 0")
        for name in ("fast_weights", "slow_weights"):
            w = getattr(self, name)
            if len(w) != 3 or min(w) < 0 or not math.isclose(sum(w), 1.0, abs_tol=1e-9):
                raise ValueError(f"DelayModel.{name}: three non-negative weights summing to 1, got {w}")

    def weights(self, slow: np.ndarray) -> np.ndarray:
        """[N, 3] mixture weights of examples whose item is slow (bool [N])."""
        return np.where(np.asarray(slow, bool)[:, None], np.array(self.slow_weights), np.array(self.fast_weights))

    def cdf(self, hours: float, slow: np.ndarray) -> np.ndarray:
        """[N] P(delay <= hours) for items with the given slow flags."""
        if hours <= 0:
            return np.zeros(np.shape(slow))
        parts = np.array([
            1.0 - math.exp(-hours / self.fast_mean_h),
            1.0 - math.exp(-hours / self.medium_mean_h),
            0.5 * math.erfc(-(math.log(hours) - math.log(self.tail_median_h)) / (self.tail_sigma * math.sqrt(2.0))),
        ])  # fmt: skip
        return self.weights(slow) @ parts

    def sample_hours(self, slow: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[N] delays in hours."""
        w = self.weights(slow)  # [N, 3]
        n = w.shape[0]
        component = (rng.random(n)[:, None] > np.cumsum(w, axis=1)).sum(axis=1).clip(0, 2)  # [N] in {0, 1, 2}
        fast = rng.exponential(self.fast_mean_h, n)
        medium = rng.exponential(self.medium_mean_h, n)
        tail = np.exp(math.log(self.tail_median_h) + self.tail_sigma * rng.standard_normal(n))
        return np.choose(component, [fast, medium, tail])


@dataclass(frozen=True)
class SyntheticStreamConfig:
    num_events: int = 200_000
    days: float = 14.0
    num_users: int = 1_000
    num_contexts: int = 16
    items_alive: int = 150
    item_lifetime_days: float = 3.0
    base_rate: float = 0.04  # mean eventual conversion probability over the drawn events
    user_effect_sd: float = 0.6
    item_effect_sd: float = 1.0
    context_effect_sd: float = 0.5
    slow_item_share: float = 0.5
    delay: DelayModel = field(default_factory=DelayModel)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_events < 1 or self.num_users < 1 or self.num_contexts < 1 or self.items_alive < 1:
            raise ValueError("SyntheticStreamConfig: num_events, num_users, num_contexts, items_alive must be >= 1")
        if not (self.days > 0 and self.item_lifetime_days > 0):
            raise ValueError("SyntheticStreamConfig: days and item_lifetime_days must be > 0")
        if not 0.0 < self.base_rate < 1.0:
            raise ValueError(f"SyntheticStreamConfig.base_rate must lie in (0, 1), got {self.base_rate}")
        if min(self.user_effect_sd, self.item_effect_sd, self.context_effect_sd) < 0:
            raise ValueError("SyntheticStreamConfig: effect sds must be >= 0")
        if not 0.0 <= self.slow_item_share <= 1.0:
            raise ValueError("SyntheticStreamConfig.slow_item_share must lie in [0, 1]")


@dataclass(frozen=True)
class ConversionStream:
    """A click stream in click-time order (N events). Times are Unix-like seconds from the stream start."""

    users: np.ndarray  # [N] int64, 1..num_users
    items: np.ndarray  # [N] int64, 1..num_items
    contexts: np.ndarray  # [N] int64, 1..num_contexts
    click_time: np.ndarray  # [N] int64 seconds, non-decreasing
    convert_time: np.ndarray  # [N] int64 seconds, NEVER when the example never converts
    true_prob: np.ndarray  # [N] float64, probability of an eventual conversion
    slow: np.ndarray  # [N] bool, the item's delay flag
    num_users: int
    num_items: int
    num_contexts: int
    delay: DelayModel

    def __len__(self) -> int:
        return int(self.click_time.shape[0])

    def window_prob(self, window_s: float) -> np.ndarray:
        """[N] true probability of the label "converted within ``window_s`` seconds of the click"."""
        return self.true_prob * self.delay.cdf(window_s / HOUR, self.slow)


def _solve_intercept(logits: np.ndarray, target: float) -> float:
    """b with mean(sigmoid(b + logits)) = target (bisection; the mean is increasing in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if (1.0 / (1.0 + np.exp(-(mid + logits)))).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def generate_conversion_stream(config: SyntheticStreamConfig) -> ConversionStream:
    """Draw a :class:`ConversionStream` (see the module docstring for the model)."""
    rng = np.random.default_rng(config.seed)
    n = config.num_events
    horizon = int(round(config.days * DAY))
    life = config.item_lifetime_days * DAY
    spacing = life / config.items_alive
    num_items = int(math.ceil((horizon + life) / spacing)) + 1
    click = np.sort(rng.integers(0, horizon, n, dtype=np.int64))
    users = rng.integers(1, config.num_users + 1, n, dtype=np.int64)
    contexts = rng.integers(1, config.num_contexts + 1, n, dtype=np.int64)
    launch = click - rng.random(n) * life  # [N] launch time of the shown item, in (t - life, t]
    items = np.clip(np.floor((launch + life) / spacing).astype(np.int64) + 1, 1, num_items)
    u_eff = rng.normal(0.0, config.user_effect_sd, config.num_users + 1)
    i_eff = rng.normal(0.0, config.item_effect_sd, num_items + 1)
    k_eff = rng.normal(0.0, config.context_effect_sd, config.num_contexts + 1)
    slow_item = rng.random(num_items + 1) < config.slow_item_share
    logits = u_eff[users] + i_eff[items] + k_eff[contexts]
    b = _solve_intercept(logits, config.base_rate)
    p = 1.0 / (1.0 + np.exp(-(b + logits)))
    converted = rng.random(n) < p
    slow = slow_item[items]
    delay_s = np.round(config.delay.sample_hours(slow, rng) * HOUR).astype(np.int64)
    convert = np.where(converted, click + delay_s, NEVER)
    return ConversionStream(users=users, items=items, contexts=contexts, click_time=click, convert_time=convert,
                            true_prob=p, slow=slow, num_users=config.num_users, num_items=num_items,
                            num_contexts=config.num_contexts, delay=config.delay)  # fmt: skip
