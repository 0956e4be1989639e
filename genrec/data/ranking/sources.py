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

Domains (surfaces; ``load_ranking_dataset(..., domains=<definition>, only_domain=<domain>)``), the definitions of
:data:`DOMAIN_DEFINITIONS`; each gives every event a domain id, and a candidate's domain is its own event's:

``ml-1m`` / ``age``: the user's ``users.dat`` age group, the three groups of the Scenario-Wise Rec benchmark
    (Li et al. 2024, arXiv 2412.17374): ``under-25`` (age codes 1 and 18), ``25-34`` (25) and ``35-plus`` (35, 45,
    50, 56). Every candidate of a user is in the user's group.
``ml-1m`` / ``genre``: the candidate movie's ``movies.dat`` genres, by a fixed priority rule (the genre lists are
    alphabetical, so "the first genre" means nothing): ``action-thriller`` when the movie has any of Action,
    Adventure, Crime, Fantasy, Film-Noir, Horror, Mystery, Sci-Fi, Thriller, War, Western; else ``comedy`` when it
    has Comedy; else ``drama-other`` (Drama, Romance, Children's, Animation, Musical, Documentary). On the complete
    file the groups hold 572,007 / 248,855 / 179,347 ratings.
``taobao-userbehavior-head`` / ``top-categories``: the file has leaf category ids only (2,914 on the head file) and
    no category hierarchy, so there are no top-level categories. The two domains are ``top-20-categories`` (the 20
    categories with the most page views in the training part, i.e. before the validation cut, so the grouping uses
    no validation or test event) and ``other-categories``.
``kuairand-27k-like-hate-subset``: none. KuaiRand's surface column ``tab`` was dropped when the subset was made, so
    the surface of an impression is not in the file.
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
    "DOMAIN_DEFINITIONS",
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


# ML-1M domains (see the module docstring)
ML_AGE_GROUPS = {"under-25": (1, 18), "25-34": (25,), "35-plus": (35, 45, 50, 56)}
ML_ACTION_GENRES = ("Action", "Adventure", "Crime", "Fantasy", "Film-Noir", "Horror", "Mystery", "Sci-Fi",
                    "Thriller", "War", "Western")  # fmt: skip
ML_GENRE_GROUPS = ("action-thriller", "comedy", "drama-other")


def ml_age_domain(ages: np.ndarray) -> np.ndarray:
    """``users.dat`` age codes -> ML-1M ``age`` domain ids (1..3 in ``ML_AGE_GROUPS`` order; 0 for another code)."""
    out = np.zeros(len(ages), dtype=np.int64)
    for k, codes in enumerate(ML_AGE_GROUPS.values(), 1):
        out[np.isin(ages, codes)] = k
    return out


def ml_genre_domain(genres: pd.DataFrame) -> np.ndarray:
    """``read_ml_genres`` rows -> ML-1M ``genre`` domain ids (1 action-thriller, 2 comedy, 3 drama-other)."""
    cols = [f"genre:{g}" for g in ML_ACTION_GENRES if f"genre:{g}" in genres.columns]
    action = genres[cols].to_numpy().sum(axis=1) > 0
    comedy = genres["genre:Comedy"].to_numpy() > 0 if "genre:Comedy" in genres.columns else np.zeros(len(genres), bool)
    return np.where(action, 1, np.where(comedy, 2, 3)).astype(np.int64)


def _ml1m_domain(definition: str, events: pd.DataFrame, users: pd.DataFrame | None,
                 genres: pd.DataFrame | None) -> tuple[tuple[str, ...], np.ndarray, str]:  # fmt: skip
    """(domain names, [N] domain id of each event, a note) of an ML-1M domain definition."""
    if definition == "age":
        if users is None:
            raise ValueError("ml-1m domains='age' needs users.dat (the users' age codes), which is not in the folder")
        by_user = pd.Series(ml_age_domain(users["age"].to_numpy()), index=users.index)
        ids = events["user"].astype(str).map(by_user).fillna(0).to_numpy(dtype=np.int64)
        names = tuple(ML_AGE_GROUPS)
        how = "the user's users.dat age group: " + "; ".join(f"{n} = codes {c}" for n, c in ML_AGE_GROUPS.items())
    elif definition == "genre":
        if genres is None:
            raise ValueError("ml-1m domains='genre' needs movies.dat (the movies' genres), which is not in the folder")
        by_item = pd.Series(ml_genre_domain(genres), index=genres.index)
        ids = events["item"].astype(str).map(by_item).fillna(0).to_numpy(dtype=np.int64)
        names = ML_GENRE_GROUPS
        how = ("the movie's genres: action-thriller if any of " + ", ".join(ML_ACTION_GENRES)
               + "; else comedy if Comedy; else drama-other")
    else:
        raise ValueError(f"ml-1m: unknown domain definition {definition!r}; known: {list(DOMAIN_DEFINITIONS['ml-1m'])}")
    return names, ids, how


def _load_ml1m(folder: Path, split: str, domains: str | None = None, **kw) -> RankingDataset:
    events, notes = ml1m_events(folder)
    users = item_dense = raw_users = None
    sizes: list[int] = []
    if (folder / "users.dat").is_file():
        raw_users = read_ml_users(folder / "users.dat")
        users, sizes = _categorical(raw_users)
    else:
        notes.append("no users.dat: no user features")
    if (folder / "movies.dat").is_file():
        item_dense = read_ml_genres(folder / "movies.dat")
    else:
        notes.append("no movies.dat: no genre features")
    names: tuple[str, ...] = ()
    if domains is not None:
        names, ids, how = _ml1m_domain(domains, events, raw_users, item_dense)
        events = events.assign(domain=ids)
        notes.append(_domain_note(domains, names, ids, how))
    return build_ranking_dataset(
        events, name="ml-1m", tasks=("like", "love"), actions=("r1", "r2", "r3", "r4", "r5"), split=split,
        user_features=users, user_feature_sizes=sizes, item_dense=item_dense, notes=notes, domains=names, **kw,
    )  # fmt: skip


def _domain_note(definition: str, names: tuple[str, ...], ids: np.ndarray, how: str) -> str:
    per = np.bincount(ids, minlength=len(names) + 1)
    counts = ", ".join(f"{n} {int(per[k + 1]):,}" for k, n in enumerate(names))
    unknown = f", unknown {int(per[0]):,}" if per[0] else ""
    return f"domains {definition!r}: {how}; events per domain in the file: {counts}{unknown}"


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
    df = df.assign(category=frame["category"].to_numpy())  # read_frame keeps every row, in order (bad rows raise)
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
        "task:buy": (code == 3).astype(np.int64), "category": df["category"].to_numpy(),
    })  # fmt: skip
    counts = ", ".join(f"{b} {int((code == i).sum()):,}" for i, b in enumerate(_TAOBAO_BEHAVIOURS))
    notes.append(f"{path.name}: {len(events):,} behaviour rows ({counts}); candidates are page views (pv)")
    return events, notes


def _day_cuts(times: np.ndarray, valid_days: int, test_days: int, tz: int) -> tuple[int, int]:
    last_day = int((times.max() + tz) // 86400)
    t_test = (last_day - test_days + 1) * 86400 - tz
    return t_test - valid_days * 86400, t_test


TAOBAO_TOP_CATEGORIES = 20  # the "top-categories" domain definition: this many categories vs the rest


def taobao_category_domain(events: pd.DataFrame, before: int, top: int = TAOBAO_TOP_CATEGORIES
                           ) -> tuple[tuple[str, ...], np.ndarray, str]:  # fmt: skip
    """(names, [N] domain ids, note) of the Taobao ``top-categories`` definition: id 1 for events of the ``top``
    categories with the most page views at times ``< before`` (the validation cut; ties broken by category id), 2
    for every other category."""
    pv = events["candidate"].to_numpy(dtype=bool) & (events["timestamp"].to_numpy() < before)
    counts = events.loc[pv, "category"].value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    head = {c for c, _ in ranked}
    ids = np.where(events["category"].isin(head).to_numpy(), 1, 2).astype(np.int64)
    names = (f"top-{top}-categories", "other-categories")
    how = (f"the item's leaf category (the file has no category hierarchy): the {len(head)} categories with the "
           f"most training-part page views ({', '.join(c for c, _ in ranked)}) vs all others")
    return names, ids, how


def _load_taobao(folder: Path, split: str, valid_days: int = 1, test_days: int = 1,
                 drop_incomplete_last_user: bool = True, domains: str | None = None,
                 **kw) -> RankingDataset:  # fmt: skip
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
    names: tuple[str, ...] = ()
    if domains is not None:
        names, ids, how = taobao_category_domain(events, int(kw["time_cuts"][0]))
        events = events.assign(domain=ids)
        notes.append(_domain_note(domains, names, ids, how))
    return build_ranking_dataset(
        events.drop(columns="category"), name="taobao-userbehavior-head", tasks=("cart", "fav", "buy"),
        actions=_TAOBAO_BEHAVIOURS, split=split, labels_from_later_events=True, tz_offset_s=BEIJING, notes=notes,
        domains=names, **kw,
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


def _load_kuairand(folder: Path, split: str, domains: str | None = None, **kw) -> RankingDataset:
    assert domains is None  # load_ranking_dataset refuses domains for KuaiRand (no definition)
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

# dataset -> {domain definition name: what it is} (the module docstring has the exact rules)
DOMAIN_DEFINITIONS: dict[str, dict[str, str]] = {
    "ml-1m": {
        "age": "the user's age group (under-25 / 25-34 / 35-plus), as in Scenario-Wise Rec",
        "genre": "the candidate movie's genre group (action-thriller / comedy / drama-other)",
    },
    "taobao-userbehavior-head": {
        "top-categories": f"the item's category: the {TAOBAO_TOP_CATEGORIES} most viewed training-part categories "
        "vs the rest (the file has no category hierarchy)",
    },
    "kuairand-27k-like-hate-subset": {},
}
_NO_DOMAINS_WHY = {
    "kuairand-27k-like-hate-subset": "KuaiRand's surface column 'tab' was dropped when the subset was made",
}


def load_ranking_dataset(
    name: str, data_dir: str | os.PathLike | None = None, split: str | None = None, *,
    domains: str | None = None, only_domain: str | None = None, **options,
) -> RankingDataset:
    """Load a ranking dataset by name (``ml-1m``, ``taobao-userbehavior-head`` / ``taobao``,
    ``kuairand-27k-like-hate-subset`` / ``kuairand``).

    ``split``: ``"user-last"`` or ``"global-time"`` (default per dataset: ML-1M user-last, the others
    global-time). ``options`` go to :func:`~genrec.data.ranking.events.build_ranking_dataset` (``n_eval``,
    ``min_events``, ``time_cuts``, ``quantiles``, ``max_candidates``, ``label_window_s``, ``smoothing``) or to the
    loader (Taobao: ``valid_days``, ``test_days``, ``drop_incomplete_last_user``).

    ``domains``: the name of one of the dataset's domain definitions (:data:`DOMAIN_DEFINITIONS`, e.g. ML-1M
    ``"age"`` or ``"genre"``): the schema then names the domains and every batch carries ``cand_domains``.
    ``only_domain``: keep only that domain's candidates in every part (a per-domain model's data; see
    :meth:`~genrec.data.ranking.events.RankingDataset.restrict_to_domain`). Unknown names raise ValueError naming
    the known ones, before any file is read.
    """
    key = _ALIASES.get(name, name)
    if key not in _LOADERS:
        raise ValueError(f"unknown ranking dataset {name!r}; known: {', '.join(sorted(_LOADERS))}")
    check_domain_definition(key, domains, only_domain)
    folder = find_dataset_folder(key, data_dir)
    dataset = _LOADERS[key](folder, split or _DEFAULT_SPLIT[key], domains=domains, **options)
    return dataset if only_domain is None else dataset.restrict_to_domain(only_domain)


def check_domain_definition(name: str, domains: str | None, only_domain: str | None = None) -> None:
    """ValueError unless ``domains`` is None or one of dataset ``name``'s domain definitions, and ``only_domain``
    is None or comes with ``domains`` (its domain names are checked when the dataset is built)."""
    key = _ALIASES.get(name, name)
    if only_domain is not None and domains is None:
        raise ValueError(f"only_domain={only_domain!r} needs domains=<definition> (the definition it is a domain of)")
    if domains is None:
        return
    known = DOMAIN_DEFINITIONS.get(key, {})
    if domains not in known:
        why = f" ({_NO_DOMAINS_WHY[key]})" if key in _NO_DOMAINS_WHY else ""
        listed = ", ".join(repr(k) for k in known) if known else "none" + why
        raise ValueError(f"{key}: unknown domain definition {domains!r}; known: {listed}")
