"""Shared fixtures: tiny deterministic synthetic data, and the path of the real development datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data_or_skip(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"development dataset not found at {path} (expected ../shared/data next to the repo)")
    return path


def synthetic_interactions(num_users: int = 40, num_items: int = 30, seed: int = 0, with_time: bool = True) -> pd.DataFrame:
    """Users walk through items with a strong 'next item = previous + 1' pattern plus noise, so models can learn."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = int(rng.integers(5, 16))
        start = int(rng.integers(0, num_items))
        t = 1_000_000 + int(rng.integers(0, 10_000))
        for i in range(n):
            item = (start + i) % num_items if rng.random() < 0.8 else int(rng.integers(0, num_items))
            t += int(rng.integers(1, 5_000))
            rows.append((f"u{u}", f"i{item}", t))
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    if not with_time:
        frame = frame.drop(columns="timestamp")
    return frame


@pytest.fixture
def interactions() -> pd.DataFrame:
    return synthetic_interactions()


def write_sequences_file(path: Path, frame: pd.DataFrame) -> None:
    """Write a frame (file order = time order) as 'user item item ...' lines."""
    with open(path, "w") as fh:
        for user, group in frame.groupby("user", sort=False):
            fh.write(" ".join([str(user)] + [str(i) for i in group["item"]]) + "\n")
