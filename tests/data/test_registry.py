"""Tests for genrec.data.registry: layouts, loading, not-found messages, fetching (no network)."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from genrec.config import DataConfig
from genrec.data.dataset import prepare_data
from genrec.data.registry import (
    BUNDLED_DIR,
    DATASETS,
    DatasetDownloadError,
    DatasetNotFoundError,
    DatasetSpec,
    LoadedDataset,
    RemoteFile,
    fetch_dataset,
    load_dataset,
    resolve_data_dir,
)
from genrec.data.sequences import build_sequences

from ..conftest import real_data_or_skip


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No real cache or $GENREC_DATA_DIR leaks into the tests."""
    monkeypatch.delenv("GENREC_DATA_DIR", raising=False)
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "cache"))


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ----------------------------------------------------------------------------- catalogue


def test_catalogue():
    for name in ("ml-1m", "ml-100k", "ml-20m", "ml-latest-small", "amazon-beauty"):
        spec = DATASETS[name]
        assert isinstance(spec, DatasetSpec) and spec.name == name
        assert spec.remote and spec.local_layouts and spec.licence and spec.description
        for remote in spec.remote:
            assert remote.url.startswith("https://")
            assert remote.sha256 is None or len(remote.sha256) == 64
    assert DATASETS["ml-1m"].remote[0].url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    beauty = {r.filename: r.sha256 for r in DATASETS["amazon-beauty"].remote}
    assert beauty["Beauty.txt"] == "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("GENREC_DATA_DIR", os.pathsep.join([str(tmp_path / "e1"), str(tmp_path / "e2")]))
    dirs = resolve_data_dir(tmp_path / "explicit")
    assert dirs == [tmp_path / "explicit", tmp_path / "e1", tmp_path / "e2", tmp_path / "cache"]
    assert resolve_data_dir() == [tmp_path / "e1", tmp_path / "e2", tmp_path / "cache"]
    monkeypatch.delenv("GENREC_CACHE_DIR")
    monkeypatch.delenv("GENREC_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the same cache root as the native kernels
    assert resolve_data_dir() == [tmp_path / "xdg" / "genrec"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == [Path.home() / ".cache" / "genrec"]


# ----------------------------------------------------------------------------- not found


def test_not_found_message_lists_files_and_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_DATA_DIR", str(tmp_path / "envdir"))
    data = tmp_path / "data"
    (data / "ml-1m").mkdir(parents=True)
    (data / "ml-1m" / "movies.dat").write_text(MOVIES_DAT)  # a companion file alone is not the dataset
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("ml-1m", data_dir=data)
    msg = str(info.value)
    for directory in (data, tmp_path / "envdir", tmp_path / "cache"):
        assert str(directory / "ml-1m" / "ratings.dat") in msg
    assert "does not exist" in msg  # envdir and cache are missing
    assert "genrec data fetch ml-1m" in msg and "--data-dir" in msg and "GENREC_DATA_DIR" in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    assert "(optional: ml-1m/movies.dat)" in msg
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.looked_for == [
        str(d / "ml-1m" / "ratings.dat") for d in (data, tmp_path / "envdir", tmp_path / "cache")
    ]


def make_old_sequence_layout(root: Path) -> Path:
    """A folder with only per-user sequence files and a partial ratings file, not the official release."""
    folder = root / "movielens-1m"
    folder.mkdir(parents=True)
    (folder / "ml-1m_user_sequences_by_time.txt.gz").write_bytes(gzip.compress(b"1 11 10 12\n2 10 12 11\n"))
    (folder / "ratings_users_1-2999.dat.gz").write_bytes(gzip.compress(b"1::11::3::100\n1::10::5::200\n"))
    (folder / "movies.dat").write_text(MOVIES_DAT)
    return folder


def test_ml1m_is_not_found_in_a_folder_of_sequence_files(tmp_path):
    """Only the official release layout is ML-1M: sequence files are read with the generic readers instead."""
    folder = make_old_sequence_layout(tmp_path)
    for data_dir in (tmp_path, folder):  # the parent, and the folder itself
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset("ml-1m", data_dir=data_dir)
        msg = str(info.value)
        assert str(data_dir / "ml-1m" / "ratings.dat") in msg
        assert "genrec data fetch ml-1m" in msg and "--data-dir" in msg
        assert "movielens-1m" not in msg.replace(str(folder), "")  # no other layout is offered
        assert "Incomplete copies" not in msg
    assert DATASETS["ml-1m"].local_layouts == (("ml-1m/ratings.dat",),)
    # such files are read with the generic sequence reader (data.dataset=sequences data.path=...)
    prepared = prepare_data(DataConfig(dataset="sequences", path=str(folder / "ml-1m_user_sequences_by_time.txt.gz")))
    assert prepared.sequences.num_users == 2 and int(prepared.sequences.lengths.sum()) == 6


def test_not_found_reports_an_incomplete_multi_file_layout(tmp_path, monkeypatch):
    spec = DatasetSpec(
        name="toy", description="toy", licence="none",
        remote=(RemoteFile("toy.zip", "https://example.org/toy.zip", None),),
        local_layouts=(("toy/a.txt", "toy/b.txt"),),
    )  # fmt: skip
    monkeypatch.setitem(DATASETS, "toy", spec)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "a.txt").write_text("1 2\n")
    with pytest.raises(DatasetNotFoundError, match=r"found toy/a\.txt but not toy/b\.txt"):
        load_dataset("toy", data_dir=tmp_path)


# ----------------------------------------------------------------------------- synthetic layouts

RATINGS_DAT = "1::10::5::300\n1::11::3::100\n2::10::4::200\n"
MOVIES_DAT = "10::Ten (1990)::Drama\n11::Eleven (1991)::Comedy\n"


def test_official_ml1m_layout(tmp_path):
    folder = tmp_path / "d" / "ml-1m"
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text(RATINGS_DAT)
    (folder / "movies.dat").write_bytes(MOVIES_DAT.encode("latin-1"))
    with pytest.warns(UserWarning, match="differs from the published totals"):
        ds = load_dataset("ml-1m", data_dir=tmp_path / "d")
    assert isinstance(ds, LoadedDataset) and ds.name == "ml-1m"
    df = ds.interactions
    assert df["user"].tolist() == ["1", "1", "2"] and df["timestamp"].tolist() == [300, 100, 200]
    assert ds.titles == {"10": "Ten (1990)", "11": "Eleven (1991)"}
    assert ds.files == [str(folder / "ratings.dat"), str(folder / "movies.dat")]
    assert any("not time order" in n for n in ds.notes)
    # the dataset folder itself may be given as data_dir
    with pytest.warns(UserWarning):
        again = load_dataset("ml-1m", data_dir=folder)
    pd.testing.assert_frame_equal(again.interactions, df)


def test_official_layout_bad_rows(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text(RATINGS_DAT + "2::x::4::1\n")
    from genrec.data.readers import BadRowError

    with pytest.raises(BadRowError, match=r"ratings\.dat:4: movie id 'x'"):
        load_dataset("ml-1m", data_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_dataset("ml-1m", data_dir=tmp_path, on_bad_rows="skip")
    assert len(ds.interactions) == 3 and ds.titles is None
    assert any("skipped 1 malformed" in n for n in ds.notes)
    assert any("titles=None" in n for n in ds.notes)


def test_beauty_layout_with_and_without_timestamps(tmp_path):
    folder = tmp_path / "amazon-beauty"
    folder.mkdir()
    (folder / "Beauty.txt").write_text("1 1 2\n2 3\n")
    with pytest.warns(UserWarning, match="published totals"):
        ds = load_dataset("amazon-beauty", data_dir=tmp_path)
    assert list(ds.interactions.columns) == ["user", "item"] and ds.titles is None
    (folder / "Beauty_time_org_rank.txt").write_text("1 5 6\n2 7\n")
    with pytest.warns(UserWarning, match="published totals"):
        ds = load_dataset("amazon-beauty", data_dir=tmp_path)
    assert ds.interactions["timestamp"].tolist() == [5, 6, 7]
    assert ds.files[-1].endswith("Beauty_time_org_rank.txt")


def test_search_order_prefers_explicit_dir(tmp_path, monkeypatch):
    for sub, ts in (("explicit", 1), ("env", 2)):
        folder = tmp_path / sub / "ml-latest-small"
        folder.mkdir(parents=True)
        (folder / "ratings.csv").write_text(f"userId,movieId,rating,timestamp\n1,1,4.0,{ts}\n")
    monkeypatch.setenv("GENREC_DATA_DIR", str(tmp_path / "env"))
    with pytest.warns(UserWarning, match="published totals"):
        assert load_dataset("ml-latest-small", tmp_path / "explicit").interactions["timestamp"].tolist() == [1]
    with pytest.warns(UserWarning, match="published totals"):
        assert load_dataset("ml-latest-small").interactions["timestamp"].tolist() == [2]


def test_bundled_ml_latest_small_needs_no_data_directory(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the September 2018 release: the published totals
        ds = load_dataset("ml-latest-small")
    folder = BUNDLED_DIR / "ml-latest-small"
    assert ds.files == [str(folder / "ratings.csv.gz"), str(folder / "movies.csv.gz")]
    for name, digest in (("ratings.csv", "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646"),
                         ("movies.csv", "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07")):  # fmt: skip
        raw = gzip.decompress((folder / f"{name}.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == digest, f"the bundled {name} is not the release's file"
    df = ds.interactions
    assert len(df) == 100_836 and df["user"].nunique() == 610 and df["item"].nunique() == 9_724
    assert df["timestamp"].notna().all() and df["rating"].notna().all()
    assert len(ds.titles) == 9_742 and ds.titles["1"] == "Toy Story (1995)"
    assert any("bundled with genrec" in n and "README.txt" in n for n in ds.notes)
    assert "Usage License" in (folder / "README.txt").read_text(encoding="utf-8")  # the licence travels with it
    # a copy in a data directory wins over the bundled one
    own = tmp_path / "mine" / "ml-latest-small"
    own.mkdir(parents=True)
    (own / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,5\n")
    with pytest.warns(UserWarning, match="published totals"):
        assert load_dataset("ml-latest-small", tmp_path / "mine").files == [str(own / "ratings.csv")]


# ----------------------------------------------------------------------------- fetching


def test_fetch_offline_error_names_url_and_local_options(tmp_path, monkeypatch):
    no_network(monkeypatch)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetDownloadError) as info:
        fetch_dataset("ml-1m")
    msg = str(info.value)
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    assert "network is unreachable" in msg
    assert "ml-1m/ratings.dat" in msg and "movielens-1m" not in msg
    assert str(cache) in msg
    assert not any(cache.iterdir())  # the temporary download directory is gone


def toy_spec(name: str, remote: tuple[RemoteFile, ...], layouts) -> DatasetSpec:
    return DatasetSpec(name=name, description="toy", licence="none", remote=remote, local_layouts=layouts)


def test_fetch_verifies_sha256_with_file_url(tmp_path, monkeypatch):
    src = tmp_path / "src" / "Beauty.txt"
    src.parent.mkdir()
    src.write_text("1 1 2\n2 2 3\n")
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "mycache"

    bad_spec = toy_spec("toy", (RemoteFile("Beauty.txt", src.as_uri(), "0" * 64),), (("toy/Beauty.txt",),))
    monkeypatch.setitem(DATASETS, "toy", bad_spec)
    with pytest.raises(DatasetDownloadError, match=f"sha256 mismatch for {src.as_uri()}.*got {good}"):
        fetch_dataset("toy", cache)
    assert not (cache / "toy").exists() and not any(cache.iterdir())

    monkeypatch.setitem(
        DATASETS, "toy", toy_spec("toy", (RemoteFile("Beauty.txt", src.as_uri(), good),), (("toy/Beauty.txt",),))
    )
    folder = fetch_dataset("toy", cache)
    assert folder == cache / "toy" and (folder / "Beauty.txt").read_bytes() == src.read_bytes()
    ds = load_dataset("toy", data_dir=cache)
    assert ds.interactions["item"].tolist() == ["1", "2", "2", "3"]

    # already there: no download unless force=True
    no_network(monkeypatch)
    assert fetch_dataset("toy", cache) == folder
    with pytest.raises(DatasetDownloadError):
        fetch_dataset("toy", cache, force=True)
    assert (folder / "Beauty.txt").is_file()  # a failed forced fetch keeps the old copy


def test_fetch_unpacks_zip(tmp_path, monkeypatch):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", RATINGS_DAT)
        zf.writestr("ml-1m/movies.dat", MOVIES_DAT)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    spec = toy_spec("ml-1m", (RemoteFile("ml-1m.zip", archive.as_uri(), sha),), DATASETS["ml-1m"].local_layouts)
    monkeypatch.setitem(DATASETS, "ml-1m", spec)
    folder = fetch_dataset("ml-1m")  # default cache = $GENREC_CACHE_DIR
    assert folder == tmp_path / "cache" / "ml-1m"
    assert sorted(p.name for p in folder.iterdir()) == ["movies.dat", "ratings.dat"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["ml-1m"]
    with pytest.warns(UserWarning, match="published totals"):
        ds = load_dataset("ml-1m")  # found in the cache
    assert len(ds.interactions) == 3 and ds.titles["11"] == "Eleven (1991)"


def test_fetch_rejects_unsafe_zip(tmp_path, monkeypatch):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    spec = toy_spec("evil", (RemoteFile("evil.zip", archive.as_uri(), None),), (("evil/a.txt",),))
    monkeypatch.setitem(DATASETS, "evil", spec)
    with pytest.warns(UserWarning, match="not verified"), pytest.raises(DatasetDownloadError, match="unsafe"):
        fetch_dataset("evil", tmp_path / "c")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- real data


def test_real_ml1m():
    """The complete ML-1M release (ml-1m/ratings.dat): every user has timestamps."""
    data = real_data_or_skip("ml-1m", "ratings.dat").parents[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counts match the published totals: no warning
        ds = load_dataset("ml-1m", data_dir=data)
    df = ds.interactions
    assert ds.files == [str(data / "ml-1m" / "ratings.dat"), str(data / "ml-1m" / "movies.dat")]
    assert len(df) == 1_000_209
    assert df["user"].nunique() == 6_040 and df["item"].nunique() == 3_706
    assert df["timestamp"].notna().all() and df["rating"].notna().all()
    ts = df["timestamp"].astype("int64")
    assert (ts.min(), ts.max()) == (956_703_932, 1_046_454_590)
    assert len(ds.titles) == 3_883 and ds.titles["1"] == "Toy Story (1995)"
    assert (df["user"].iloc[0], df["item"].iloc[0], int(df["timestamp"].iloc[0])) == ("1", "1193", 978300760)
    notes = "\n".join(ds.notes)
    assert "1,000,209 ratings with timestamps" in notes
    for wrong in ("<NA>", "without timestamps", "only for"):
        assert wrong not in notes
    seqs = build_sequences(df)
    assert seqs.has_time.all() and seqs.num_users == 6_040 and seqs.lengths.sum() == 1_000_209
    assert "users with timestamps 6,040/6,040" in seqs.summary()
    # the dataset folder itself may be given, as may the folder via $GENREC_DATA_DIR
    again = load_dataset("ml-1m", data_dir=data / "ml-1m")
    assert again.files == ds.files


def test_real_amazon_beauty():
    data = real_data_or_skip("amazon-beauty-s3rec")
    ds = load_dataset("amazon-beauty", data_dir=data)
    df = ds.interactions
    assert len(df) == 198_502 and df["user"].nunique() == 22_363 and df["item"].nunique() == 12_101
    assert df["timestamp"].notna().all() and df["timestamp"].dtype == "Int64"
    assert ds.titles is None


def test_real_ml100k():
    data = real_data_or_skip("movielens-100k")
    ds = load_dataset("ml-100k", data_dir=data)
    assert len(ds.interactions) == 100_000 and len(ds.titles) == 1_682
    assert ds.interactions["timestamp"].notna().all()


def test_real_ml_latest_small_copy_equals_the_bundled_one():
    data = real_data_or_skip("movielens-latest-small")
    ds = load_dataset("ml-latest-small", data_dir=data)
    assert ds.files[0] == str(data / "ratings.csv")  # an explicit copy wins over the bundled one
    bundled = load_dataset("ml-latest-small")
    assert len(ds.interactions) == 100_836 and len(ds.titles) == 9_742
    pd.testing.assert_frame_equal(ds.interactions, bundled.interactions, check_like=False)
    assert ds.titles == bundled.titles
