"""Real logs -> ranking event tables -> :class:`~genrec.data.ranking.events.RankingDataset`.

Datasets (folder names as in a data directory; found like the registry's datasets: ``data_dir``, then each entry
of ``$GENREC_DATA_DIR``, then the cache directory; a search directory may also be the dataset folder itself):

``ml-1m`` (``ml-1m/ratings.dat``; optional ``users.dat``, ``movies.dat``)
    One event per rating. Actions ``r1..r5``: rating r sets bit r - 1 (DLRM-v3's MovieLens encoding). Tasks
    ``like`` (r >= 4, DLRM-v3's ``rating >= 3.5``) and ``love`` (r == 5). User features from ``users.dat``: sex, age
    group, occupation, zip code (each a categorical with ids 1..size in sorted value order). Item dense features:
    the 18 genre indicators of ``movies.dat`` (``genre:<name>``; the schema has no item categorical features, so the
    multi-hot genre vector is given as 0/1 dense columns). Default split ``user-last`` (10 + 10 per user, users with
    >= 21 ratings; every ML-1M user has >= 20, so the few with exactly 20 are training-only).
    Hours are taken at UTC (the users' time zones are unknown).

``taobao-userbehavior-head`` (``UserBehavior_head.csv``)
    One event per behaviour row; actions ``pv, cart, fav, buy``. Candidates are page views; tasks ``cart, fav, buy``
    of a page view are 1 when the same user carts / favourites / buys the same item at or after the view's time,
    within ``label_window_s`` (default one hour; ``None`` for no bound) and before the end of the view's split part.
    The one-hour default keeps the parts comparable: without a bound a training-day view has days to convert while
    a view of the one-day test part has hours, so the training base rates were 1.5-1.7 times the test rates (cart
    0.0151 / 0.0088, buy 0.0270 / 0.0182 on the head file; with the hour 0.0074 / 0.0066 and 0.0148 / 0.0127).
    About half of the head file's carts and buys that follow a view of the same item come within the hour. History holds every
    behaviour (views, carts, favs, buys) strictly before the row's earliest candidate. The file is a byte prefix of
    the official log: an unterminated last line is a truncated record and is dropped, and the last user of such a
    file is incomplete and dropped too (``drop_incomplete_last_user``). Exact duplicate rows are dropped. Split
    ``global-time`` by calendar day in Beijing time (UTC+8): the last day is test, the day before validation, all
    earlier days (including a few rows dated before the official 2017-11-25 start) training. The category column is
    not used (the schema has no item categorical features).

``kuairand-27k-like-hate-subset`` (``processed_standard_kcore_15.tsv``)
    One event per impression. Actions ``click, long_view, like, hate, follow, comment, forward, profile_enter``;
    tasks the same less ``profile_enter``. ``time_ms`` becomes Unix seconds (floor) with the milliseconds kept as the
    tie-break inside a second. Default split ``global-time`` at the 0.8 / 0.9 time quantiles; ``user-last`` works
    too. Hours at Beijing time (UTC+8). The rows were filtered to liked-or-hated impressions, which the schema notes
    say: every base rate is skewed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.data.ranking.events import RankingDataset, build_ranking_dataset
from genrec.data.readers import BadRowError, read_frame, read_movielens_dat
from genrec.data.readers.common import _read_bytes
from genrec.data.registry import DatasetNotFoundError, resolve_data_dir

__all__ = [
    "RANKING_DATASETS",
    "find_dataset_folder",
    "find_folder",
    "kuairand_events",
    "load_ranking_dataset",
    "ml1m_events",
    "taobao_events",
]  # fmt: skip

BEIJING = 8 * 3600
# Taobao: a page view's cart / fav / buy counts within this many seconds of the view (see the module docstring)
TAOBAO_LABEL_WINDOW_S = 3600

# name -> (folder, required files, optional files)
RANKING_DATASETS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "ml-1m": ("ml-1m", ("ratings.dat",), ("users.dat", "movies.dat")),
    "taobao-userbehavior-head": ("taobao-userbehavior-head", ("UserBehavior_head.csv",), ()),
    "kuairand-27k-like-hate-subset": ("kuairand-27k-like-hate-subset", ("processed_standard_kcore_15.tsv",), ()),
}
_ALIASES = {"taobao": "taobao-userbehavior-head", "kuairand": "kuairand-27k-like-hate-subset"}


def find_dataset_folder(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The first ``<search dir>/<folder>`` (or search dir that *is* the folder) holding the dataset's files."""
    folder, required, _ = RANKING_DATASETS[name]
    return find_folder(name, folder, required, data_dir)


def find_folder(name: str, folder: str, required: tuple[str, ...], data_dir: str | os.PathLike | None) -> Path:
    """Search ``data_dir``, ``$GENREC_DATA_DIR`` and the cache for ``folder/<required files>``; raise
    :class:`~genrec.data.registry.DatasetNotFoundError` listing every path looked for."""
    looked: list[str] = []
    for base in resolve_data_dir(data_dir):
        for cand in (base / folder, base) if base.name == folder else (base / folder,):
            paths = [cand / f for f in required]
            if all(p.is_file() for p in paths):
                return cand
            looked += [str(p) for p in paths]
    raise DatasetNotFoundError(
        f"dataset {name!r} not found. Looked for:\n  " + "\n  ".join(looked)
        + f"\nPass data_dir=DIR (--data-dir) or set GENREC_DATA_DIR=DIR, where DIR contains {folder}/"
        + " + ".join(required),
        name=name,
        looked_for=looked,
    )


# ------------------------------------------------------------------------------------------------ ML-1M


def _dat_lines(path: Path) -> list[str]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the GroupLens .dat files are Latin-1
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def read_ml_users(path: Path) -> pd.DataFrame:
    """``users.dat``: ``UserID::Gender::Age::Occupation::Zip-code`` -> DataFrame indexed by user id (str)."""
    rows = []
    for i, line in enumerate(_dat_lines(path), 1):
        f = line.split("::")
        if len(f) != 5:
            raise BadRowError(path, i, f"expected 5 fields separated by '::', got {len(f)}")
        if not f[0].isdigit():
            raise BadRowError(path, i, f"user id {f[0]!r} is not a non-negative integer")
        if f[1] not in ("M", "F"):
            raise BadRowError(path, i, f"gender {f[1]!r} is not M or F")
        if not f[2].isdigit() or not f[3].isdigit():
            raise BadRowError(path, i, f"age {f[2]!r} / occupation {f[3]!r} must be integers")
        rows.append((f[0], f[1], int(f[2]), int(f[3]), f[4].strip()))
    frame = pd.DataFrame(rows, columns=["user", "sex", "age", "occupation", "zip"]).set_index("user")
    if frame.index.duplicated().any():
        raise ValueError(f"{path}: user {frame.index[frame.index.duplicated()][0]} is listed twice")
    return frame


def read_ml_genres(path: Path) -> pd.DataFrame:
    """``movies.dat``: ``MovieID::Title::Genres`` -> 0/1 frame (index movie id, one ``genre:<g>`` column per genre)."""
    ids, genres = [], []
    for i, line in enumerate(_dat_lines(path), 1):
        f = line.split("::")
        if len(f) != 3:
            raise BadRowError(path, i, f"expected 3 fields separated by '::', got {len(f)}")
        ids.append(f[0])
        genres.append([g for g in f[2].split("|") if g])
    names = sorted({g for gs in genres for g in gs})
    table = np.zeros((len(ids), len(names)), dtype=np.float32)
    col = {g: j for j, g in enumerate(names)}
    for r, gs in enumerate(genres):
        table[r, [col[g] for g in gs]] = 1.0
    return pd.DataFrame(table, index=pd.Index(ids, name="item"), columns=[f"genre:{g}" for g in names])


def _categorical(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    """Each column -> ids 1..size in sorted value order."""
    out, sizes = {}, []
    for c in frame.columns:
        values = np.sort(frame[c].unique())
        out[c] = np.searchsorted(values, frame[c].to_numpy()) + 1
        sizes.append(len(values))
    return pd.DataFrame(out, index=frame.index), sizes


def ml1m_events(folder: Path) -> tuple[pd.DataFrame, list[str]]:
    """ML-1M ``ratings.dat`` -> event table (see :mod:`genrec.data.ranking.events`) and notes."""
    path = folder / "ratings.dat"
    df = read_movielens_dat(path)
    r = df["rating"].to_numpy()
    bad = ~np.isin(r, (1.0, 2.0, 3.0, 4.0, 5.0))
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 1
        raise BadRowError(path, line, f"rating {r[line - 1]!r} is not a whole star 1..5")
    ri = r.astype(np.int64)
    events = pd.DataFrame({
        "user": df["user"], "item": df["item"], "timestamp": df["timestamp"].astype(np.int64),
        "actions": np.left_shift(1, ri - 1).astype(np.int64), "candidate": True,
        "task:like": (ri >= 4).astype(np.int64), "task:love": (ri == 5).astype(np.int64),
    })  # fmt: skip
    return events, [f"{path.name}: {len(df):,} ratings; like = rating >= 4, love = rating == 5"]


def _load_ml1m(folder: Path, split: str, **kw) -> RankingDataset:
    events, notes = ml1m_events(folder)
    users = item_dense = None
    sizes: list[int] = []
    if (folder / "users.dat").is_file():
        users, sizes = _categorical(read_ml_users(folder / "users.dat"))
    else:
        notes.append("no users.dat: no user features")
    if (folder / "movies.dat").is_file():
        item_dense = read_ml_genres(folder / "movies.dat")
    else:
        notes.append("no movies.dat: no genre features")
    return build_ranking_dataset(
        events, name="ml-1m", tasks=("like", "love"), actions=("r1", "r2", "r3", "r4", "r5"), split=split,
        user_features=users, user_feature_sizes=sizes, item_dense=item_dense, notes=notes, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ Taobao

_TAOBAO_BEHAVIOURS = ("pv", "cart", "fav", "buy")


def taobao_events(path: Path, drop_incomplete_last_user: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Taobao ``UserBehavior`` CSV (``user,item,category,behavior,timestamp``, no header) -> event table, notes."""
    raw = _read_bytes(path)
    notes: list[str] = []
    truncated = bool(raw) and not raw.endswith(b"\n")
    if truncated:
        cut = raw.rfind(b"\n") + 1
        notes.append(f"{path.name}: dropped the unterminated last line {raw[cut:][:80]!r} (a truncated record)")
        raw = raw[:cut]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRowError(path, raw[: exc.start].count(b"\n") + 1, "invalid UTF-8 byte(s)") from None
    frame = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False, sep=",",
                        names=["user", "item", "category", "behavior", "timestamp"], on_bad_lines="error")  # fmt: skip
    if frame.isna().any().any():
        line = int(np.flatnonzero(frame.isna().any(axis=1).to_numpy())[0]) + 1
        raise BadRowError(path, line, "expected 5 fields separated by ','")
    df = read_frame(frame, user="user", item="item", timestamp="timestamp", event="behavior", source=str(path))
    bad = ~df["event"].isin(_TAOBAO_BEHAVIOURS)
    if bad.any():
        line = int(np.flatnonzero(bad.to_numpy())[0]) + 1
        raise BadRowError(path, line, f"behaviour {df['event'].iloc[line - 1]!r} is not one of {_TAOBAO_BEHAVIOURS}")
    if truncated and drop_incomplete_last_user:
        last = df["user"].iloc[-1]
        keep = df["user"] != last
        notes.append(f"dropped the last user {last} ({int((~keep).sum())} rows): the file is cut inside that user")
        df = df[keep]
    dup = df.duplicated(["user", "item", "event", "timestamp"])
    if dup.any():
        notes.append(f"dropped {int(dup.sum()):,} exact duplicate rows (same user, item, behaviour, second)")
        df = df[~dup]
    code = pd.Categorical(df["event"], categories=_TAOBAO_BEHAVIOURS).codes.astype(np.int64)
    events = pd.DataFrame({
        "user": df["user"].to_numpy(), "item": df["item"].to_numpy(),
        "timestamp": df["timestamp"].to_numpy(dtype=np.int64),
        "actions": np.left_shift(1, code), "candidate": code == 0,
        "task:cart": (code == 1).astype(np.int64), "task:fav": (code == 2).astype(np.int64),
        "task:buy": (code == 3).astype(np.int64),
    })  # fmt: skip
    counts = ", ".join(f"{b} {int((code == i).sum()):,}" for i, b in enumerate(_TAOBAO_BEHAVIOURS))
    notes.append(f"{path.name}: {len(events):,} behaviour rows ({counts}); candidates are page views (pv)")
    return events, notes


def _day_cuts(times: np.ndarray, valid_days: int, test_days: int, tz: int) -> tuple[int, int]:
    last_day = int((times.max() + tz) // 86400)
    t_test = (last_day - test_days + 1) * 86400 - tz
    return t_test - valid_days * 86400, t_test


def _load_taobao(folder: Path, split: str, valid_days: int = 1, test_days: int = 1,
                 drop_incomplete_last_user: bool = True, **kw) -> RankingDataset:  # fmt: skip
    if split != "global-time":
        raise ValueError("taobao-userbehavior-head supports only split='global-time' (by day)")
    events, notes = taobao_events(folder / "UserBehavior_head.csv", drop_incomplete_last_user)
    kw.setdefault("label_window_s", TAOBAO_LABEL_WINDOW_S)
    if "time_cuts" not in kw or kw["time_cuts"] is None:
        kw["time_cuts"] = _day_cuts(events["timestamp"].to_numpy(), valid_days, test_days, BEIJING)
        notes.append(
            f"day split (Beijing time): the last {test_days} day(s) test, the {valid_days} day(s) before validation"
        )
    window = kw.get("label_window_s")
    notes.append(
        "labels: a page view's cart/fav/buy is 1 when the user carts/favs/buys the same item at or after the view "
        "and before the end of the view's split part" + (f" and within {window} s" if window else "")
    )
    return build_ranking_dataset(
        events, name="taobao-userbehavior-head", tasks=("cart", "fav", "buy"), actions=_TAOBAO_BEHAVIOURS,
        split=split, labels_from_later_events=True, tz_offset_s=BEIJING, notes=notes, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ KuaiRand

_KUAI_HEADER = ("user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_follow", "is_comment",
                "is_forward", "long_view", "play_time_ms", "duration_ms", "comment_stay_time", "is_profile_enter",
                "label", "timestamp")  # fmt: skip
KUAI_ACTIONS = ("click", "long_view", "like", "hate", "follow", "comment", "forward", "profile_enter")
KUAI_TASKS = KUAI_ACTIONS[:-1]
_KUAI_COLUMN = {"click": "is_click", "long_view": "long_view", "follow": "is_follow", "comment": "is_comment",
                "forward": "is_forward", "profile_enter": "is_profile_enter"}  # fmt: skip


def kuairand_events(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """KuaiRand like/hate subset TSV -> event table and notes (see the module docstring)."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, on_bad_lines="error")
    if tuple(frame.columns) != _KUAI_HEADER:
        raise BadRowError(path, 1, f"header {tuple(frame.columns)} is not {_KUAI_HEADER}")
    ms = pd.to_numeric(frame["time_ms"], errors="coerce")
    if ms.isna().any():
        line = int(np.flatnonzero(ms.isna().to_numpy())[0]) + 2
        raise BadRowError(path, line, f"time_ms {frame['time_ms'].iloc[line - 2]!r} is not an integer")
    ms = ms.to_numpy(dtype=np.int64)
    frame = frame.assign(_ts=ms // 1000)
    df = read_frame(frame, user="user_id", item="video_id", timestamp="_ts", source=str(path))
    flags = {}
    for col in [c for c in _KUAI_COLUMN.values()] + ["label"]:
        ok = frame[col].isin(("0", "1")).to_numpy()
        if not ok.all():
            line = int(np.flatnonzero(~ok)[0]) + 2
            raise BadRowError(path, line, f"{col} {frame[col].iloc[line - 2]!r} is not 0 or 1")
        flags[col] = (frame[col] == "1").to_numpy().astype(np.int64)
    value = {a: flags[c] for a, c in _KUAI_COLUMN.items()}
    value["like"] = flags["label"]
    value["hate"] = 1 - flags["label"]
    bits = sum(np.left_shift(value[a], i) for i, a in enumerate(KUAI_ACTIONS))
    events = pd.DataFrame({"user": df["user"].to_numpy(), "item": df["item"].to_numpy(),
                           "timestamp": df["timestamp"].to_numpy(dtype=np.int64), "order": ms,
                           "actions": bits.astype(np.int64), "candidate": True,
                           **{f"task:{t}": value[t] for t in KUAI_TASKS}})  # fmt: skip
    notes = [
        (f"{path.name}: {len(events):,} impressions; rows were filtered to liked-or-hated impressions (and a "
        "15-core on likes), so every row is a like or a hate and click / like / hate base rates are far above "
        "those of the full KuaiRand log; histories hold only each user's liked and hated impressions"),
        "time_ms floored to Unix seconds, milliseconds kept as the tie-break inside a second",
    ]
    return events, notes


def _load_kuairand(folder: Path, split: str, **kw) -> RankingDataset:
    events, notes = kuairand_events(folder / "processed_standard_kcore_15.tsv")
    return build_ranking_dataset(
        events, name="kuairand-27k-like-hate-subset", tasks=KUAI_TASKS, actions=KUAI_ACTIONS, split=split,
        tz_offset_s=BEIJING, notes=notes, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ entry point

_DEFAULT_SPLIT = {"ml-1m": "user-last", "taobao-userbehavior-head": "global-time",
                  "kuairand-27k-like-hate-subset": "global-time"}  # fmt: skip
_LOADERS = {"ml-1m": _load_ml1m, "taobao-userbehavior-head": _load_taobao,
            "kuairand-27k-like-hate-subset": _load_kuairand}  # fmt: skip


def load_ranking_dataset(
    name: str, data_dir: str | os.PathLike | None = None, split: str | None = None, **options
) -> RankingDataset:
    """Load a ranking dataset by name (``ml-1m``, ``taobao-userbehavior-head`` / ``taobao``,
    ``kuairand-27k-like-hate-subset`` / ``kuairand``).

    ``split``: ``"user-last"`` or ``"global-time"`` (default per dataset: ML-1M user-last, the others
    global-time). ``options`` go to :func:`~genrec.data.ranking.events.build_ranking_dataset` (``n_eval``,
    ``min_events``, ``time_cuts``, ``quantiles``, ``max_candidates``, ``label_window_s``, ``smoothing``) or to the
    loader (Taobao: ``valid_days``, ``test_days``, ``drop_incomplete_last_user``).
    """
    key = _ALIASES.get(name, name)
    if key not in _LOADERS:
        raise ValueError(f"unknown ranking dataset {name!r}; known: {', '.join(sorted(_LOADERS))}")
    folder = find_dataset_folder(key, data_dir)
    return _LOADERS[key](folder, split or _DEFAULT_SPLIT[key], **options)
