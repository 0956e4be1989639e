"""Shared fixtures: tiny deterministic synthetic data, and where the real datasets for the real-data tests are.

Real-data tests find their data directory with :func:`find_test_data`: ``$GENREC_TEST_DATA`` if set (it must then
exist), else ``<repo>/../shared/data``, else the first ``shared/data`` in a parent directory of the repository. The
pytest header says which directory is used, or that none was found (the real-data tests are then skipped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA_ENV = "GENREC_TEST_DATA"


def find_test_data() -> tuple[Path | None, str]:
    """(directory of the real datasets or None, how it was found)."""
    env = os.environ.get(TEST_DATA_ENV)
    if env:
        return Path(env).expanduser().resolve(), f"${TEST_DATA_ENV}"
    for parent in ROOT.parents:  # ROOT.parent first: <repo>/../shared/data
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate.resolve(), "shared/data next to or above the repository"
    return None, f"not found: set ${TEST_DATA_ENV}, or put shared/data next to or above the repository"


TEST_DATA, TEST_DATA_ORIGIN = find_test_data()


def pytest_configure(config) -> None:
    if TEST_DATA is not None and TEST_DATA_ORIGIN.startswith("$") and not TEST_DATA.is_dir():
        raise pytest.UsageError(f"${TEST_DATA_ENV}={TEST_DATA} is not a directory")


def pytest_report_header(config) -> str:
    if TEST_DATA is None:
        return f"genrec real-data tests: no data directory ({TEST_DATA_ORIGIN}); they are skipped"
    return f"genrec real-data tests: data directory {TEST_DATA} (from {TEST_DATA_ORIGIN})"


def real_data_or_skip(*parts: str) -> Path:
    """The real-data directory (or a file / folder inside it); skips the test when it is not there."""
    if TEST_DATA is None:
        pytest.skip(f"real datasets {TEST_DATA_ORIGIN}")
    path = TEST_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found in the real-data directory ({TEST_DATA_ORIGIN})")
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
