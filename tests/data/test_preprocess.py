"""Bounded-memory preprocessing (genrec.data.preprocess) and the per-rank shard reader (genrec.data.shards).

The reference is genrec's in-memory path, ``build_sequences(read_table(...))``, on the same tiny synthetic files:
the partitioned output must give the same users, order, item numbering, sequences and timestamps.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

pl = pytest.importorskip("polars")

from genrec.data.preprocess import MANIFEST_FILE, USERS_FILE, part_file, preprocess_interactions  # noqa: E402
from genrec.data.readers import BadRowError, read_table  # noqa: E402
from genrec.data.sequences import build_sequences  # noqa: E402
from genrec.data.shards import ShardedSequences, read_shard  # noqa: E402


def _log(n: int = 3000, users: int = 160, items: int = 400, seed: int = 0) -> pd.DataFrame:
    """A skewed little log with many same-timestamp ties, exact duplicates and users shorter than 3."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "user": [f"u{x}" for x in rng.zipf(1.3, n) % users],
        "item": [f"i{x}" for x in rng.zipf(1.2, n) % items],
        "ts": rng.integers(1_600_000_000, 1_600_000_040, n),  # 40 distinct times: ties everywhere
        "rating": rng.integers(1, 6, n).astype(float),
        "action": rng.choice(["click", "cart", "buy"], n),
    })
    dup = rng.choice(n - 1, n // 20, replace=False)  # exact duplicates of the previous row
    frame.iloc[dup + 1] = frame.iloc[dup].to_numpy()
    frame["ts"] = frame["ts"].astype(np.int64)
    frame["rating"] = frame["rating"].astype(float)
    return frame


def _assert_same(ref, got) -> None:
    assert list(got.users) == list(ref.users)
    assert got.item_map.external == ref.item_map.external
    for field in ("offsets", "items", "timestamps", "has_time"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "log.csv"
    _log().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def out(log_csv, tmp_path_factory):
    directory = tmp_path_factory.mktemp("out")
    preprocess_interactions(log_csv, directory, user="user", item="item", timestamp="ts", rating="rating",
                            event="action", partitions=6, bucket_rows=500, batch_rows=700)
    return directory


@pytest.mark.parametrize("timestamp", ["ts", None])
@pytest.mark.parametrize("duplicates", ["drop", "keep"])
def test_equals_in_memory_builder(log_csv, tmp_path, timestamp, duplicates):
    ref = build_sequences(read_table(log_csv, user="user", item="item", timestamp=timestamp),
                          duplicates=duplicates)
    manifest = preprocess_interactions(log_csv, tmp_path, user="user", item="item", timestamp=timestamp,
                                       duplicates=duplicates, partitions=3, bucket_rows=400, batch_rows=500)
    _assert_same(ref, read_shard(tmp_path))
    assert manifest["notes"][: len(ref.notes)] == ref.notes
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (
        ref.num_users, ref.num_items, len(ref.items))


def test_ties_keep_file_order_across_batches_and_files(tmp_path):
    # user a: three items at t=5 in file order y, z, x across two files and batch boundaries
    (tmp_path / "a.csv").write_text("u,i,t\na,y,5\nb,p,1\na,w,1\n")
    (tmp_path / "b.csv").write_text("u,i,t\nb,q,1\na,z,5\nb,r,1\na,x,5\n")
    preprocess_interactions([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "out", user="u", item="i",
                            timestamp="t", partitions=2, batch_rows=2, bucket_rows=1)
    seqs = read_shard(tmp_path / "out")
    assert list(seqs.users) == ["a", "b"]
    assert seqs.item_map.to_external(seqs.sequence(0)) == ["w", "y", "z", "x"]
    assert seqs.item_map.to_external(seqs.sequence(1)) == ["p", "q", "r"]
    both = pd.concat([pd.read_csv(tmp_path / "a.csv", dtype=str), pd.read_csv(tmp_path / "b.csv", dtype=str)])
    both.to_csv(tmp_path / "ab.csv", index=False)
    _assert_same(build_sequences(read_table(tmp_path / "ab.csv", user="u", item="i", timestamp="t")), seqs)


def test_parquet_input_with_integer_ids_and_bucket_count_does_not_matter(tmp_path):
    frame = _log(seed=1)
    frame["user"] = frame["user"].str[1:].astype(np.int64) * 1_000_003
    frame["item"] = frame["item"].str[1:].astype(np.int64) + 10**12
    frame.to_parquet(tmp_path / "log.parquet")
    ref = build_sequences(read_table(tmp_path / "log.parquet", user="user", item="item", timestamp="ts"))
    for bucket_rows in (10**6, 300):
        preprocess_interactions(tmp_path / "log.parquet", tmp_path / "out", user="user", item="item",
                                timestamp="ts", partitions=4, bucket_rows=bucket_rows, overwrite=True)
        _assert_same(ref, read_shard(tmp_path / "out"))


def test_every_user_in_exactly_one_partition(out):
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    seen = []
    for p, entry in enumerate(manifest["partitions"]):
        part = pd.read_parquet(out / part_file(p))
        assert entry == {"file": part_file(p), "users": len(part), "interactions": int(part["items"].map(len).sum())}
        assert (part["user"] % manifest["num_partitions"] == p).all()
        seen.extend(part["user"])
    assert sorted(seen) == list(range(manifest["num_users"]))
    users = pd.read_parquet(out / USERS_FILE)
    assert sorted(users["user"]) == list(range(manifest["num_users"]))
    assert (users["partition"] == users["user"] % manifest["num_partitions"]).all()
    assert users["user_id"].is_unique


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
def test_shards_are_disjoint_and_cover_everything(out, world_size):
    data = ShardedSequences(out)
    whole = data.read(0, 1)
    item_map = whole.sequences.item_map
    got_users, rows = [], {}
    for rank in range(world_size):
        shard = data.read(rank, world_size, item_map=item_map)
        assert shard.partitions == list(range(rank, data.num_partitions, world_size))
        assert np.all(np.diff(shard.user_index) > 0)
        got_users.extend(shard.user_index.tolist())
        for k, u in enumerate(shard.user_index):
            rows[int(u)] = (shard.sequences.sequence(k).tolist(), shard.sequences.times(k).tolist(),
                            shard.sequences.users[k])
        streamed = {s.user: (s.items.tolist(), s.timestamps.tolist(), s.user_id)
                    for s in data.iter_users(rank, world_size)}
        assert streamed == {int(u): rows[int(u)] for u in shard.user_index}
    assert sorted(got_users) == list(range(data.num_users))  # disjoint (no repeats) and complete
    assert len(got_users) == len(set(got_users))
    for u in range(data.num_users):
        seq = whole.sequences
        assert rows[u] == (seq.sequence(u).tolist(), seq.times(u).tolist(), seq.users[u])
    with pytest.raises(ValueError, match="7 ranks but only 6 partitions"):
        data.read(0, 7)
    with pytest.raises(ValueError, match="rank must be in"):
        data.read(world_size, world_size)


def test_id_mapping_round_trips(out, log_csv):
    data = ShardedSequences(out)
    item_map = data.item_map()
    assert len(item_map) == data.num_items
    assert item_map.to_internal(item_map.to_external(range(1, data.num_items + 1))).tolist() == list(
        range(1, data.num_items + 1))
    raw = pd.read_csv(log_csv, dtype=str).drop_duplicates(["user", "item", "ts"])
    raw["ts"] = raw["ts"].astype(np.int64)
    shard = data.read()
    users = pd.read_parquet(out / USERS_FILE).set_index("user")
    for k in range(0, shard.sequences.num_users, 7):
        user_id = shard.sequences.users[k]
        assert users.loc[int(shard.user_index[k]), "user_id"] == user_id
        rows = raw[raw["user"] == user_id].sort_values("ts", kind="stable")
        assert item_map.to_external(shard.sequences.sequence(k)) == rows["item"].tolist()
        assert shard.sequences.times(k).tolist() == rows["ts"].tolist()
    part = pd.read_parquet(out / part_file(0))
    first = raw[raw["user"] == part["user_id"][0]].sort_values("ts", kind="stable")
    assert part["events"][0].tolist() == first["action"].tolist()
    assert part["ratings"][0].tolist() == first["rating"].astype(float).tolist()


def test_missing_column_names_the_file(log_csv, tmp_path):
    with pytest.raises(ValueError, match=rf"{log_csv}: no column for timestamp='time'; the columns are"):
        preprocess_interactions(log_csv, tmp_path, user="user", item="item", timestamp="time")


def test_non_integer_timestamp_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("u,i,t\na,x,1\na,y,2\nb,z,2019-01-01x\n")
    with pytest.raises(BadRowError, match=r"bad\.csv:4: missing or non-integer timestamp \(column 't'\): "
                                          r"'2019-01-01x'") as err:
        preprocess_interactions(path, tmp_path / "out", user="u", item="i", timestamp="t", batch_rows=2)
    assert err.value.path == str(path) and err.value.line == 4
    frame = pd.DataFrame({"u": ["a", "b"], "i": ["x", "y"], "t": [1.0, 2.5]})
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(BadRowError, match=r"bad\.parquet:2: missing or non-integer timestamp"):
        preprocess_interactions(tmp_path / "bad.parquet", tmp_path / "out", user="u", item="i", timestamp="t")


def test_empty_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"{empty}: the file is empty"):
        preprocess_interactions(empty, tmp_path / "out", user="u", item="i")
    header = tmp_path / "header.csv"
    header.write_text("u,i,t\n")
    with pytest.raises(ValueError, match=rf"{header}: the file has no data rows"):
        preprocess_interactions(header, tmp_path / "out", user="u", item="i", timestamp="t")
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the spill folder is removed


def test_refuses_to_overwrite_and_reports_short_logs(log_csv, out, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess_interactions(log_csv, out, user="user", item="item")
    short = tmp_path / "short.csv"
    short.write_text("u,i\na,x\na,y\nb,z\n")
    with pytest.raises(ValueError, match="no user has at least 3 interactions"):
        preprocess_interactions(short, tmp_path / "o", user="u", item="i")


def test_manifest_records_the_run(out, log_csv):
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["format"] == "genrec-sequences" and m["version"] == 1
    assert m["source"] == {"files": [str(log_csv)], "rows": [3000],
                           "columns": {"user": "user", "item": "item", "timestamp": "ts", "rating": "rating",
                                       "event": "action"}}
    assert m["schema"]["partition"] == {"user": "int64", "user_id": "large_string", "items": "large_list<item: int64>",
                                        "timestamps": "large_list<item: int64>",
                                        "ratings": "large_list<item: double>",
                                        "events": "large_list<item: large_string>"}
    assert m["command"] and m["created"] and m["polars"] == pl.__version__
    assert m["config"]["buckets"] == 6  # ceil(3000 estimated rows / 500)


def test_without_polars_the_error_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "polars", None)
    with pytest.raises(ImportError, match="pip install polars"):
        preprocess_interactions(tmp_path / "x.csv", tmp_path / "out", user="u", item="i")


def test_a_shard_feeds_training_batches(out):
    from genrec.data.batches import training_batch
    from genrec.data.sequences import leave_one_out

    data = ShardedSequences(out)
    seqs = data.read(1, 3).sequences
    split = leave_one_out(seqs, "train")
    batch = training_batch(seqs, split, np.arange(min(8, seqs.num_users)), max_len=16)
    assert batch.item_ids.max() <= data.num_items and bool(batch.has_time.all())


def test_command_line(log_csv, tmp_path, capsys):
    from genrec.data.preprocess import main

    assert main([str(log_csv), "-o", str(tmp_path), "--user", "user", "--item", "item", "--timestamp", "ts",
                 "--partitions", "2"]) == 0
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["command"].startswith("python -m genrec.data.preprocess ") and "--partitions 2" in manifest["command"]
    assert "users" in capsys.readouterr().out


def test_training_data_from_a_preprocessed_directory_equals_the_table(log_csv, out):
    """``data.dataset=preprocessed`` gives training the sequences ``data.dataset=table`` builds from the same log."""
    from genrec.config import DataConfig
    from genrec.data.dataset import prepare_data

    columns = {"user": "user", "item": "item", "timestamp": "ts"}
    table = prepare_data(DataConfig(dataset="table", path=str(log_csv), columns=columns)).sequences
    got = prepare_data(DataConfig(dataset="preprocessed", path=str(out))).sequences
    _assert_same(table, got)


def test_preprocessed_directory_written_with_other_settings_is_refused(out):
    from genrec.config import ConfigError, DataConfig
    from genrec.data.dataset import prepare_data

    with pytest.raises(ValueError, match="min_seq_len=5 but .* was written with min_seq_len=3"):
        prepare_data(DataConfig(dataset="preprocessed", path=str(out), min_seq_len=5))
    with pytest.raises(ValueError, match="ties='shuffle'"):
        prepare_data(DataConfig(dataset="preprocessed", path=str(out), ties="shuffle"))
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig(dataset="preprocessed")
