"""Delayed conversion feedback: label snapshots, window routing by hash, and per-method training plans on a stream.

An example clicked at ``c`` converts at ``v`` (``NEVER`` when it does not). A training snapshot at time ``t`` may
read only conversions observed by then, so the label it sees for an attribution window ``w`` is::

    snapshot label(t, w) = [v <= t] and [v - c <= w]        (:func:`snapshot_labels`)

which equals the window label ``[v - c <= w]`` (:func:`window_labels`) once ``t >= c + w``; before that a pending
conversion reads as a negative. The evaluation label is always the true label of the longest window ``W``.

The stream is cut at snapshot times ``b_0 < b_1 < … < b_K`` (:func:`segment_boundaries`): ``b_0`` is the stream
start, segment ``k`` holds the clicks in ``[b_k, b_{k+1})``. **Pretrain** is shared by every method and is trained
at ``b_0`` on the examples whose longest window has closed by then (``c + W <= b_0``), each head on its own window
label (every one of them is observed at ``b_0``). Every later example is trained once, at a boundary chosen by the
method (:func:`training_plan`, index ``k`` = boundary ``b_k``):

* ``vanilla`` (pending-as-negative, the FNW/FNC papers' "Vanilla" baseline): at the first boundary after the
  click, label ``[v <= t] and [v - c <= W]``.
* ``wait`` (wait for the longest window): at the first boundary ``t >= c + W``, label ``[v - c <= W]``.
* ``window_heads`` ("Lattice Zipper" of L. Luo et al., "Meta Lattice: Model Space Redesign for Cost-Effective
  Industry-Scale Ads Recommendations", arXiv:2512.09200, 2025, as secondary summaries describe it: each impression
  is routed by a deterministic hash of (user, item, time) to exactly one attribution window, the model has one head
  per window on a shared backbone, serving reads the longest-window head): the example routed to window ``w`` is
  trained at the first boundary ``t >= c + w``, on head ``w`` only (a one-hot ``label_weights`` row), label
  ``[v - c <= w]``. Routing probabilities are configurable (uniform by default, as described).
* ``oracle`` (an upper bound, not a method): at the first boundary after the click, with the true label
  ``[v - c <= W]`` (it reads the future).

Every plan except ``oracle`` reads only labels observed by its training time (tested with a planted late conversion).
Examples whose training boundary would fall after ``b_K`` are not trained. Times are int64 seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "METHODS",
    "NEVER",
    "TrainingPlan",
    "WindowRouting",
    "hash_unit",
    "pretrain_plan",
    "segment_boundaries",
    "segment_of",
    "snapshot_labels",
    "training_plan",
    "window_labels",
]

NEVER = np.iinfo(np.int64).max  # conversion time of an example that never converts
METHODS = ("vanilla", "wait", "window_heads", "oracle")
_MASK64 = (1 << 64) - 1


def _int64(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D integer array, got dtype {a.dtype} and shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _times(click, convert) -> tuple[np.ndarray, np.ndarray]:
    c, v = _int64(click, "click"), _int64(convert, "convert")
    if c.shape != v.shape:
        raise ValueError(f"click and convert have different lengths: {c.shape[0]} and {v.shape[0]}")
    if bool((v < c).any()):
        raise ValueError(f"convert: {int((v < c).sum())} conversion(s) before their click")
    return c, v


def window_labels(click, convert, window_s: int) -> np.ndarray:
    """[N] bool, converted within ``window_s`` seconds of the click (the true label of that window)."""
    c, v = _times(click, convert)
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    return (v != NEVER) & (v - c <= window_s)


def snapshot_labels(click, convert, t: int, window_s: int) -> np.ndarray:
    """[N] bool, the label of window ``window_s`` a snapshot at time ``t`` observes: ``[v <= t] and [v - c <= w]``."""
    return window_labels(click, convert, window_s) & (_int64(convert, "convert") <= t)


# ------------------------------------------------------------------------------------------------ routing
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (S. Vigna) on uint64, wrapping arithmetic: a well-mixed deterministic 64-bit hash."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(_MASK64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(_MASK64)
    return x ^ (x >> np.uint64(31))


def hash_unit(users, items, times, salt: int = 0) -> np.ndarray:
    """[N] float64 in [0, 1): a deterministic hash of each (user, item, time) triple (and ``salt``).

    The three integers are chained through SplitMix64 (h = mix(h ^ field)), and the top 53 bits give the fraction, so
    the value depends on the triple alone (never on the order or the batch it comes in) and on no global state.
    """
    u, i, t = _int64(users, "users"), _int64(items, "items"), _int64(times, "times")
    if not (u.shape == i.shape == t.shape):
        raise ValueError(f"users, items and times have different lengths: {u.shape}, {i.shape}, {t.shape}")
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(u.shape, np.uint64(salt & _MASK64)))
        for field in (u, i, t):
            h = _splitmix64(h ^ field.view(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class WindowRouting:
    """Attribution windows (ascending seconds) and the probability an example is routed to each."""

    windows_s: tuple[int, ...]
    probs: tuple[float, ...]
    salt: int = 0

    def __post_init__(self) -> None:
        w = tuple(int(x) for x in self.windows_s)
        p = tuple(float(x) for x in self.probs)
        object.__setattr__(self, "windows_s", w)
        object.__setattr__(self, "probs", p)
        if not w or any(x <= 0 for x in w) or any(a >= b for a, b in zip(w, w[1:])):
            raise ValueError(f"WindowRouting.windows_s: positive and strictly ascending, got {w}")
        if len(p) != len(w):
            raise ValueError(f"WindowRouting.probs: {len(p)} probabilities for {len(w)} windows")
        if any(not math.isfinite(x) or x <= 0 for x in p) or not math.isclose(sum(p), 1.0, abs_tol=1e-9):
            raise ValueError(f"WindowRouting.probs: positive (every window is covered) and summing to 1, got {p}")

    @classmethod
    def uniform(cls, windows_s: Sequence[int], salt: int = 0) -> WindowRouting:
        return cls(tuple(windows_s), tuple([1.0 / len(windows_s)] * len(windows_s)), salt)

    @property
    def longest(self) -> int:
        return self.windows_s[-1]

    def route(self, users, items, times) -> np.ndarray:
        """[N] int64 index of the window (head) each (user, item, time) is routed to."""
        cuts = np.cumsum(self.probs)[:-1]  # [K-1] inner cut points of [0, 1)
        return np.searchsorted(cuts, hash_unit(users, items, times, self.salt), side="right").astype(np.int64)


# ------------------------------------------------------------------------------------------------ segments
def segment_boundaries(start: int, end: int, segment_s: int) -> np.ndarray:
    """[K + 1] int64 snapshot times ``start, start + s, …`` with the last one >= ``end`` (K >= 1 segments)."""
    if segment_s <= 0:
        raise ValueError(f"segment_s must be > 0, got {segment_s}")
    if end <= start:
        raise ValueError(f"the stream must end after it starts, got start={start}, end={end}")
    k = int(math.ceil((end - start) / segment_s))
    return start + segment_s * np.arange(k + 1, dtype=np.int64)


def segment_of(click, boundaries: np.ndarray) -> np.ndarray:
    """[N] int64 segment k with ``b_k <= c < b_{k+1}``; -1 before ``b_0``, K at or after ``b_K``."""
    b = _boundaries(boundaries)
    return np.searchsorted(b, _int64(click, "click"), side="right").astype(np.int64) - 1


def _boundaries(boundaries) -> np.ndarray:
    b = _int64(boundaries, "boundaries")
    if b.size < 2 or bool((np.diff(b) <= 0).any()):
        raise ValueError("boundaries: at least two strictly increasing snapshot times")
    return b


def _first_boundary_at_or_after(times: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] index of the first boundary >= each time; len(b) when there is none."""
    return np.searchsorted(b, times, side="left").astype(np.int64)


# ------------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class TrainingPlan:
    """When and how each of N examples is trained, for T windows (heads, ascending)."""

    train_at: np.ndarray  # [N] int64 boundary index k (trained at b_k), -1 = not trained
    labels: np.ndarray  # [N, T] float32 0/1
    weights: np.ndarray  # [N, T] float32 label weights (0 = no label for that head)

    def at(self, k: int) -> np.ndarray:
        """Indices of the examples trained at boundary k."""
        return np.flatnonzero(self.train_at == k)


def pretrain_plan(click, convert, t0: int, windows_s: Sequence[int]) -> TrainingPlan:
    """The shared Pretrain set: examples with ``c + W <= t0``, every head on its window label (all observed by
    ``t0``); ``train_at`` is 0 (the snapshot at ``t0``) for them, -1 for the rest."""
    c, v = _times(click, convert)
    windows = _windows(windows_s)
    done = c + windows[-1] <= t0
    labels = np.stack([window_labels(c, v, w) for w in windows], axis=1).astype(np.float32)
    weights = np.repeat(done[:, None], len(windows), axis=1).astype(np.float32)
    return TrainingPlan(np.where(done, 0, -1).astype(np.int64), labels * weights, weights)


def _windows(windows_s: Sequence[int]) -> tuple[int, ...]:
    w = tuple(int(x) for x in windows_s)
    if not w or any(x <= 0 for x in w) or any(a >= b for a, b in zip(w, w[1:])):
        raise ValueError(f"windows_s: positive and strictly ascending, got {w}")
    return w


def training_plan(method: str, click, convert, boundaries, routing: WindowRouting, users=None, items=None
                  ) -> TrainingPlan:  # fmt: skip
    """Per-example training boundary, labels and label weights of ``method`` (see the module docstring).

    Examples in the Pretrain set (``c + W <= b_0``) are left out (``train_at`` -1); so are examples whose training
    boundary falls after the last one. ``users`` and ``items`` are needed by ``window_heads`` (the routing hash).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    c, v = _times(click, convert)
    b = _boundaries(boundaries)
    windows = routing.windows_s
    W, T, n = windows[-1], len(windows), c.shape[0]
    streamed = c + W > b[0]  # not in the Pretrain set
    labels = np.zeros((n, T), np.float32)
    weights = np.zeros((n, T), np.float32)
    rows = np.arange(n)
    if method in ("vanilla", "oracle"):
        k = np.searchsorted(b, c, side="right").astype(np.int64)  # first boundary strictly after the click
        k = np.maximum(k, 0)
        t = b[np.minimum(k, b.size - 1)]
        head = np.full(n, T - 1, np.int64)
        y = window_labels(c, v, W) & ((v <= t) if method == "vanilla" else True)
    elif method == "wait":
        k = _first_boundary_at_or_after(c + W, b)
        head = np.full(n, T - 1, np.int64)
        y = window_labels(c, v, W)
    else:
        if users is None or items is None:
            raise ValueError("window_heads needs users and items (the routing hash reads (user, item, time))")
        head = routing.route(users, items, c)
        w = np.asarray(windows, np.int64)[head]
        k = _first_boundary_at_or_after(c + w, b)
        y = (v != NEVER) & (v - c <= w)
    ok = streamed & (k < b.size)
    labels[rows, head] = (y & ok).astype(np.float32)
    weights[rows, head] = ok.astype(np.float32)
    return TrainingPlan(np.where(ok, k, -1).astype(np.int64), labels, weights)
