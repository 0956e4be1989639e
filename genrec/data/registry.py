"""Named datasets: where their files may live locally, how to load them, how to fetch them.

Search path (:func:`resolve_data_dir`): the explicit ``data_dir`` argument (``--data-dir``),
then every directory in ``$GENREC_DATA_DIR`` (``os.pathsep``-separated), then the cache
directory (``$GENREC_CACHE_DIR``, default ``~/.cache/genrec``), where
:func:`fetch_dataset` puts downloads.  A dataset with a ``bundled`` copy (``ml-latest-small``,
shipped as package data in ``genrec/data/bundled/``, licence terms included) is found there
last, so it needs no data directory at all, while a copy in the search path still wins.

Each :class:`DatasetSpec` lists ``local_layouts``: alternative sets of file paths,
relative to a search directory, in preference order; the first directory (in search
order) holding every file of some layout wins.  A search directory may also be the
dataset folder itself (``--data-dir .../ml-1m``).  Companion files next to the main
file are optional: titles (``movies.dat``, ``u.item``, ``movies.csv``) and the Amazon
Beauty timestamp file (``Beauty_time_org_rank.txt``).

Checksums of the GroupLens zips (``ml-1m``, ``ml-100k``, ``ml-20m``) are the sha256 values
that TensorFlow Datasets registers for those URLs (``url_checksums/movielens.txt``; the
ml-1m size there is 5,917,549 bytes).  ``ml-latest-small.zip`` has ``sha256=None``: GroupLens says that "development"
archive may change over time, so a pinned hash could go stale; it is downloaded
unverified (with a warning that prints its sha256).  The Amazon Beauty files are pinned
to the sha256 of the published copies.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import pandas as pd

from genrec.data.readers import (
    read_ml100k,
    read_movielens_csv,
    read_movielens_dat,
    read_sequences,
    read_titles,
)
from genrec.io import cache_dir

__all__ = [
    "BUNDLED_DIR",
    "RemoteFile",
    "DatasetSpec",
    "LoadedDataset",
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetDownloadError",
    "default_cache_dir",
    "resolve_data_dir",
    "load_dataset",
    "fetch_dataset",
]


# Datasets shipped as package data (see genrec/data/bundled/README.md).
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


@dataclass(frozen=True)
class RemoteFile:
    """An official download: a zip (unpacked by :func:`fetch_dataset`) or a plain file."""

    filename: str
    url: str
    sha256: str | None  # None: no checksum known for certain; the download is not verified


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    licence: str
    remote: tuple[RemoteFile, ...]
    local_layouts: tuple[tuple[str, ...], ...]
    # A copy shipped with genrec: True when BUNDLED_DIR holds the first layout (searched last).
    bundled: bool = False


@dataclass
class LoadedDataset:
    name: str
    interactions: pd.DataFrame
    titles: dict[str, str] | None
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


class DatasetNotFoundError(FileNotFoundError):
    """No accepted layout of a dataset was found in the search path.  The message lists every
    file looked for, in which directories, and how to get the data."""

    def __init__(self, message: str, *, name: str = "", looked_for: list[str] | None = None):
        super().__init__(message)
        self.name = name
        self.looked_for = list(looked_for or [])

    def __str__(self) -> str:
        return str(self.args[0])


class DatasetDownloadError(OSError):
    """A download failed, or its sha256 did not match, or the archive lacked the files."""

    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------------------
# the catalogue

_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
_GROUPLENS_LICENCE = (
    "GroupLens usage licence (the README inside the archive): research use only; "
    "do not imply endorsement; cite F. M. Harper and J. A. Konstan, 'The MovieLens Datasets: "
    "History and Context', ACM TiiS 5(4), 2015; {redistribution}; no commercial or "
    "revenue-bearing use without permission."
)

DATASETS: dict[str, DatasetSpec] = {
    "ml-1m": DatasetSpec(
        name="ml-1m",
        description=(
            "MovieLens 1M: 1,000,209 ratings (1-5 stars, Unix-second timestamps) by 6,040 users "
            "on 3,706 movies, 2000-2003; titles and genres in movies.dat."
        ),
        licence=_GROUPLENS_LICENCE.format(redistribution="no redistribution without permission"),
        remote=(
            RemoteFile(
                "ml-1m.zip",
                _GROUPLENS + "ml-1m.zip",
                "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            ),
        ),
        local_layouts=(("ml-1m/ratings.dat",),),
    ),
    "ml-100k": DatasetSpec(
        name="ml-100k",
        description=(
            "MovieLens 100K: 100,000 ratings (1-5 stars, timestamps) by 943 users on 1,682 movies, "
            "1997-1998; titles in u.item."
        ),
        licence=_GROUPLENS_LICENCE.format(redistribution="no redistribution without permission"),
        remote=(
            RemoteFile(
                "ml-100k.zip",
                _GROUPLENS + "ml-100k.zip",
                "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            ),
        ),
        local_layouts=(("ml-100k/u.data",), ("movielens-100k/u.data",)),
    ),
    "ml-20m": DatasetSpec(
        name="ml-20m",
        description=(
            "MovieLens 20M: 20,000,263 ratings (0.5-5 stars, timestamps) by 138,493 users, "
            "1995-2015; titles and genres in movies.csv."
        ),
        licence=_GROUPLENS_LICENCE.format(redistribution="no redistribution without permission"),
        remote=(
            RemoteFile(
                "ml-20m.zip",
                _GROUPLENS + "ml-20m.zip",
                "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
            ),
        ),
        local_layouts=(("ml-20m/ratings.csv",),),
    ),
    "ml-latest-small": DatasetSpec(
        name="ml-latest-small",
        description=(
            "MovieLens latest-small (a development dataset that GroupLens may update; the 2018 "
            "release has 100,836 ratings by 610 users on 9,724 movies); titles in movies.csv."
        ),
        licence=_GROUPLENS_LICENCE.format(
            redistribution="redistribution, including transformations, only under these same terms"
        ),
        remote=(RemoteFile("ml-latest-small.zip", _GROUPLENS + "ml-latest-small.zip", None),),
        local_layouts=(
            ("ml-latest-small/ratings.csv",),
            ("movielens-latest-small/ratings.csv",),
            ("ml-latest-small/ratings.csv.gz",),  # the bundled copy is stored gzip-compressed
        ),
        bundled=True,
    ),
    "amazon-beauty": DatasetSpec(
        name="amazon-beauty",
        description=(
            "Amazon Beauty 5-core (2014 reviews) in S3-Rec's preprocessing: 22,363 users, 12,101 "
            "items, 198,502 interactions as time-ordered sequences (Beauty.txt), plus TiCoSeRec's "
            "position-aligned day-granularity timestamps (Beauty_time_org_rank.txt)."
        ),
        licence=(
            "Amazon review data (J. McAuley, UCSD; McAuley et al. SIGIR 2015, He & McAuley WWW "
            "2016): research use only, no formal open licence, do not redistribute publicly. "
            "Preprocessing by RUCAIBox/CIKM2020-S3Rec (no licence file); timestamp file from "
            "KingGugu/TiCoSeRec (code under Apache-2.0)."
        ),
        remote=(
            RemoteFile(
                "Beauty.txt",
                "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data/Beauty.txt",
                "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
            ),
            RemoteFile(
                "Beauty_time_org_rank.txt",
                "https://raw.githubusercontent.com/KingGugu/TiCoSeRec/main/data/Beauty/"
                "Beauty_time_org_rank.txt",
                "4e6a6e30f9dba1985ad9adae79a891df6b403e2132f0422a6f6e88f67d1fcc75",
            ),
        ),
        local_layouts=(("amazon-beauty-s3rec/Beauty.txt",), ("amazon-beauty/Beauty.txt",)),
    ),
}

# Published totals (rows, users, items); a loaded dataset that differs gets a note and a warning.
_PUBLISHED: dict[str, tuple[int, int, int | None]] = {
    "ml-1m": (1_000_209, 6_040, 3_706),
    "ml-100k": (100_000, 943, 1_682),
    "ml-20m": (20_000_263, 138_493, None),
    "ml-latest-small": (100_836, 610, 9_724),  # the September 2018 release (the bundled copy)
    "amazon-beauty": (198_502, 22_363, 12_101),
}

# Optional companion files, looked for next to a layout's first file (keyed by its name).
_COMPANIONS: dict[str, tuple[str, ...]] = {
    "ratings.dat": ("movies.dat",),
    "u.data": ("u.item",),
    "ratings.csv": ("movies.csv",),
    "ratings.csv.gz": ("movies.csv.gz",),
    "Beauty.txt": ("Beauty_time_org_rank.txt",),
}


# --------------------------------------------------------------------------------------
# search path


def default_cache_dir() -> Path:
    """``$GENREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/genrec``, else ``~/.cache/genrec`` (``genrec.io.cache_dir``)."""
    return cache_dir()


def _search_path(data_dir=None) -> list[tuple[Path, str]]:
    entries: list[tuple[Path, str]] = []
    if data_dir is not None:
        entries.append((Path(data_dir).expanduser(), "data_dir / --data-dir"))
    env = os.environ.get("GENREC_DATA_DIR")
    if env:
        for part in env.split(os.pathsep):
            if part.strip():
                entries.append((Path(part.strip()).expanduser(), "$GENREC_DATA_DIR"))
    entries.append((default_cache_dir(), "cache: $GENREC_CACHE_DIR or ~/.cache/genrec"))
    seen: set[str] = set()
    out = []
    for path, origin in entries:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            out.append((path, origin))
    return out


def _search_for(spec: DatasetSpec, data_dir=None) -> list[tuple[Path, str]]:
    """The search path for ``spec``: :func:`resolve_data_dir`'s directories, then the bundled copy if any."""
    search = _search_path(data_dir)
    if spec.bundled:
        search.append((BUNDLED_DIR, "bundled with genrec"))
    return search


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for datasets, in order: ``data_dir`` (if given), each entry of
    ``$GENREC_DATA_DIR``, then the cache directory.  Duplicates are removed; directories
    that do not exist are kept (they are reported in error messages)."""
    return [p for p, _ in _search_path(data_dir)]


def _get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def _bases(directory: Path, layout: tuple[str, ...]) -> list[Path]:
    """``directory`` itself, and its parent when ``directory`` *is* the layout's folder."""
    bases = [directory]
    folder = PurePosixPath(layout[0]).parts[0] if layout else ""
    if len(PurePosixPath(layout[0]).parts) > 1 and directory.name == folder:
        bases.append(directory.parent)
    return bases


def _find(spec: DatasetSpec, search: list[tuple[Path, str]]) -> tuple[Path, tuple[str, ...]] | None:
    for directory, _ in search:
        for layout in spec.local_layouts:
            for base in _bases(directory, layout):
                if all((base / rel).is_file() for rel in layout):
                    return base, layout
    return None


def _layout_text(layout: tuple[str, ...]) -> str:
    text = " + ".join(layout)
    extra = _COMPANIONS.get(PurePosixPath(layout[0]).name, ())
    if extra:
        folder = str(PurePosixPath(layout[0]).parent)
        text += "   (optional: " + ", ".join(f"{folder}/{e}" for e in extra) + ")"
    return text


def _where_to_put(spec: DatasetSpec, search: list[tuple[Path, str]]) -> str:
    lines = ["Accepted layouts (paths relative to a search directory, in preference order):"]
    lines += [f"  - {_layout_text(layout)}" for layout in spec.local_layouts]
    lines.append("Search directories, in order:")
    for directory, origin in search:
        state = "" if directory.is_dir() else "; does not exist"
        lines.append(f"  - {directory}  ({origin}{state})")
    return "\n".join(lines)


def _not_found(spec: DatasetSpec, search: list[tuple[Path, str]]) -> DatasetNotFoundError:
    looked: list[str] = []
    lines = [f"dataset {spec.name!r} not found. Looked for these files:"]
    partial = []
    for directory, origin in search:
        state = "" if directory.is_dir() else "; directory does not exist"
        lines.append(f"  in {directory}  ({origin}{state}):")
        for layout in spec.local_layouts:
            lines.append(f"    - {' + '.join(str(directory / rel) for rel in layout)}")
            looked.extend(str(directory / rel) for rel in layout)
            if directory.is_dir():
                for base in _bases(directory, layout):
                    present = [rel for rel in layout if (base / rel).is_file()]
                    if present:
                        missing = [rel for rel in layout if rel not in present]
                        partial.append(
                            f"  - in {base}: found {', '.join(present)} but not {', '.join(missing)}"
                        )
    if partial:
        lines.append("Incomplete copies:")
        lines += partial
    lines.append(
        f"To get it: run `genrec data fetch {spec.name}` (downloads "
        f"{', '.join(r.url for r in spec.remote)} into {default_cache_dir()}), or pass "
        "--data-dir DIR (data_dir=DIR) or set GENREC_DATA_DIR=DIR, where DIR contains one of: "
        + "; ".join(_layout_text(layout) for layout in spec.local_layouts)
        + "."
    )
    return DatasetNotFoundError("\n".join(lines), name=spec.name, looked_for=looked)


# --------------------------------------------------------------------------------------
# loading


def _fmt(n: int) -> str:
    return f"{n:,}"


def _tie_note(df: pd.DataFrame) -> str | None:
    if "timestamp" not in df or df["timestamp"].isna().all():
        return None
    known = df[df["timestamp"].notna()]
    tied = int(known.duplicated(["user", "timestamp"], keep=False).sum())
    return (
        f"{_fmt(tied)} of {_fmt(len(known))} timed interactions share their timestamp with "
        "another interaction of the same user; they keep their file order unless data.ties=shuffle"
    )


def _titles(folder: Path, filename: str, files: list[str], notes: list[str]):
    path = folder / filename
    if not path.is_file():
        notes.append(f"no {filename} next to the ratings: titles=None")
        return None
    files.append(str(path))
    return read_titles(path)


def _load_ml_official(folder: Path, main: Path, on_bad_rows: str, files: list[str], notes: list[str]):
    reader = read_movielens_dat if main.name.endswith(".dat") else read_movielens_csv
    df = reader(main, on_bad_rows=on_bad_rows)
    notes.append(
        f"{main.name}: {_fmt(len(df))} ratings with timestamps, in file order (not time order); "
        "sort each user's rows by timestamp (stable) to get sequences"
    )
    title_file = _COMPANIONS[main.name][0]  # movies.dat, movies.csv or movies.csv.gz, next to the ratings
    return df, _titles(folder, title_file, files, notes)


def _load_ml100k(folder: Path, main: Path, on_bad_rows: str, files: list[str], notes: list[str]):
    df = read_ml100k(main, on_bad_rows=on_bad_rows)
    notes.append(
        f"u.data: {_fmt(len(df))} ratings with timestamps, in file order, which is neither by "
        "user nor by time; sort each user's rows by timestamp (stable) to get sequences"
    )
    return df, _titles(folder, "u.item", files, notes)


def _load_beauty(folder: Path, main: Path, on_bad_rows: str, files: list[str], notes: list[str]):
    ts_path = folder / "Beauty_time_org_rank.txt"
    if ts_path.is_file():
        df = read_sequences(main, ts_path, on_bad_rows=on_bad_rows)
        files.append(str(ts_path))
        groups = len(df[["user", "timestamp"]].drop_duplicates())
        notes.append(
            f"{main.name}: S3-Rec sequences, oldest first ({_fmt(len(df))} interactions); "
            f"timestamps from {ts_path.name} (TiCoSeRec), position-aligned, day granularity "
            f"(midnight UTC): the interactions fall into {_fmt(groups)} (user, day) groups, and "
            "ties keep the file order"
        )
    else:
        df = read_sequences(main, on_bad_rows=on_bad_rows)
        notes.append(
            f"{main.name}: S3-Rec sequences, oldest first ({_fmt(len(df))} interactions); no "
            f"{ts_path.name} found, so no timestamp column (file order is time order)"
        )
    return df, None


_LOADERS: dict[str, Callable] = {
    "ratings.dat": _load_ml_official,
    "ratings.csv": _load_ml_official,
    "ratings.csv.gz": _load_ml_official,
    "u.data": _load_ml100k,
    "Beauty.txt": _load_beauty,
}


def _check_published(name: str, df: pd.DataFrame, notes: list[str]) -> None:
    if name not in _PUBLISHED:
        return
    rows, users, items = _PUBLISHED[name]
    got = (len(df), df["user"].nunique(), df["item"].nunique())
    diffs = [
        f"{what} {_fmt(g)} (published {_fmt(want)})"
        for what, g, want in zip(("rows", "users", "items"), got, (rows, users, items))
        if want is not None and g != want
    ]
    if diffs:
        msg = f"{name}: this copy differs from the published totals: " + ", ".join(diffs)
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)


def load_dataset(name: str, data_dir=None, on_bad_rows: str = "error") -> LoadedDataset:
    """Load a named dataset from the first search directory holding one of its layouts.

    ``interactions`` is what the readers return (columns ``user, item`` and, where the
    source has them, ``timestamp``/``rating``), in file order.  See ``notes`` for what the
    copy contains (e.g. whether it has timestamps, ties among them, titles).  Only the files
    of a dataset's official release are accepted (ML-1M: ``ml-1m/ratings.dat``); other
    files, such as per-user sequence files, are read with the generic readers
    (``data.dataset=sequences`` / ``table``).
    Raises :class:`DatasetNotFoundError` listing every path looked for.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    spec = _get_spec(name)
    search = _search_for(spec, data_dir)
    found = _find(spec, search)
    if found is None:
        raise _not_found(spec, search)
    base, layout = found
    main = base / layout[0]
    folder = main.parent
    loader = _LOADERS.get(main.name)
    if loader is None:
        raise ValueError(f"no loader for {main.name} (dataset {name!r})")
    files = [str(main)]
    notes: list[str] = []
    if spec.bundled and base == BUNDLED_DIR:
        notes.append(
            f"the copy of {name} bundled with genrec ({folder}); its licence terms are in {folder / 'README.txt'}"
        )
    df, titles = loader(folder, main, on_bad_rows, files, notes)
    tie = _tie_note(df)
    if tie:
        notes.append(tie)
    if df.attrs.get("bad_rows"):
        notes.append(f"skipped {_fmt(df.attrs['bad_rows'])} malformed rows (on_bad_rows='skip')")
    _check_published(name, df, notes)
    return LoadedDataset(name=name, interactions=df, titles=titles, notes=notes, files=files)


# --------------------------------------------------------------------------------------
# fetching


def _download(url: str, dest: Path, sha256: str | None, help_text: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "genrec-data-fetch"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=60) as resp, open(dest, "wb") as out:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DatasetDownloadError(
            f"could not download {url}: {reason}\n"
            "Without network access, copy the files yourself.\n" + help_text
        ) from exc
    got = digest.hexdigest()
    if sha256 is None:
        warnings.warn(
            f"no sha256 is known for {url}; the download was not verified (its sha256 is {got})",
            UserWarning,
            stacklevel=3,
        )
    elif got.lower() != sha256.lower():
        raise DatasetDownloadError(
            f"sha256 mismatch for {url}: expected {sha256}, got {got}; the file was not installed"
        )


def _extract_zip(archive: Path, dest: Path) -> None:
    """Extract, refusing absolute paths and '..'.  Members not all under one top-level folder
    are put under a folder named after the archive."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetDownloadError(f"{archive.name} is not a valid zip file: {exc}") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        tops = {PurePosixPath(m.filename).parts[0] for m in members if m.filename}
        single = len(tops) == 1 and all(len(PurePosixPath(m.filename).parts) > 1 for m in members)
        root = dest if single else dest / Path(archive.name).stem
        for m in members:
            parts = PurePosixPath(m.filename.replace("\\", "/")).parts
            if not parts or m.filename.startswith("/") or ".." in parts or ":" in parts[0]:
                raise DatasetDownloadError(f"{archive.name}: unsafe member path {m.filename!r}")
            target = root.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def fetch_dataset(name: str, cache_dir=None, *, force: bool = False) -> Path:
    """Download a dataset's official files into the cache directory and return its folder.

    ``cache_dir`` defaults to ``$GENREC_CACHE_DIR`` or ``~/.cache/genrec``.  If the cache
    already holds an accepted layout and ``force`` is false, nothing is downloaded.  Files
    are downloaded with :mod:`urllib` into a temporary directory inside the cache, checked
    against their sha256 when one is known (see the module docstring for which), zips are
    unpacked there, and only then is the dataset folder moved into place (``os.replace``),
    so an interrupted fetch never leaves a half-written dataset behind.

    Raises :class:`DatasetDownloadError` naming the URL that failed and the local layouts
    and directories that would be accepted instead.
    """
    spec = _get_spec(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_search = [(cache, "cache")]
    if not force:
        found = _find(spec, cache_search)
        if found is not None:
            base, layout = found
            return (base / layout[0]).parent

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetDownloadError(f"cannot create cache directory {cache}: {exc}") from exc
    search = _search_path(None)
    if all(os.path.abspath(cache) != os.path.abspath(p) for p, _ in search):
        search.append((cache, "cache_dir argument"))
    help_text = (
        f"Place the files of {spec.name!r} so that one of the layouts below exists in one of "
        "the search directories (or pass --data-dir / set GENREC_DATA_DIR).\n"
        + _where_to_put(spec, search)
    )

    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{spec.name}-", dir=cache))
    try:
        downloads = staging / "download"
        tree = staging / "tree"
        downloads.mkdir()
        tree.mkdir()
        plain = [r for r in spec.remote if not r.filename.lower().endswith(".zip")]
        plain_names = {r.filename for r in plain}
        plain_folder = next(
            (
                PurePosixPath(layout[0]).parts[0]
                for layout in spec.local_layouts
                if len(PurePosixPath(layout[0]).parts) > 1
                and {PurePosixPath(rel).name for rel in layout} <= plain_names
            ),
            spec.name,
        )
        for remote in spec.remote:
            dest = downloads / remote.filename
            _download(remote.url, dest, remote.sha256, help_text)
            if remote.filename.lower().endswith(".zip"):
                _extract_zip(dest, tree)
                dest.unlink()
            else:
                (tree / plain_folder).mkdir(exist_ok=True)
                os.replace(dest, tree / plain_folder / remote.filename)

        found = _find(spec, [(tree, "download")])
        if found is None:
            got = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
            raise DatasetDownloadError(
                f"the downloaded files of {spec.name!r} do not contain any accepted layout "
                f"({'; '.join(' + '.join(lay) for lay in spec.local_layouts)}); got {got[:20]}"
            )
        for entry in sorted(tree.iterdir()):
            target = cache / entry.name
            if target.exists():
                old = staging / f"old-{entry.name}"
                os.replace(target, old)
            os.replace(entry, target)
        base, layout = found
        return cache / layout[0].split("/")[0] if "/" in layout[0] else cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
