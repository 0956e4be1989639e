"""Tests for genrec.data.readers on tiny synthetic files (written to tmp_path)."""

from __future__ import annotations

import gzip
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest

from genrec.data.readers import (
    BadRowError,
    SkippedRowsWarning,
    read_frame,
    read_ml100k,
    read_movielens_csv,
    read_movielens_dat,
    read_sequences,
    read_table,
    read_titles,
)


def write(path, text: str, *, gz: bool = False, encoding: str = "utf-8"):
    data = text.encode(encoding)
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def assert_interaction_dtypes(df: pd.DataFrame) -> None:
    assert pd.api.types.is_string_dtype(df["user"])
    assert pd.api.types.is_string_dtype(df["item"])
    if "timestamp" in df:
        assert df["timestamp"].dtype == "Int64"
    if "rating" in df:
        assert df["rating"].dtype == np.float64
    if "event" in df:
        assert pd.api.types.is_string_dtype(df["event"])


ML_DAT = "2::20::5::300\n1::10::3::200\n1::11::4.5::100\n"


# ----------------------------------------------------------------------------- MovieLens


@pytest.mark.parametrize("gz", [False, True])
def test_movielens_dat_plain_and_gz(tmp_path, gz):
    path = write(tmp_path / ("ratings.dat.gz" if gz else "ratings.dat"), ML_DAT, gz=gz)
    df = read_movielens_dat(path)
    assert list(df.columns) == ["user", "item", "timestamp", "rating"]
    assert_interaction_dtypes(df)
    # file order, not sorted by user or time
    assert df["user"].tolist() == ["2", "1", "1"]
    assert df["item"].tolist() == ["20", "10", "11"]
    assert df["timestamp"].tolist() == [300, 200, 100]
    assert df["rating"].tolist() == [5.0, 3.0, 4.5]
    assert df.attrs == {"source": str(path), "bad_rows": 0}


def test_movielens_dat_crlf_and_trailing_blank_lines(tmp_path):
    path = write(tmp_path / "ratings.dat", ML_DAT.replace("\n", "\r\n") + "\r\n\n")
    df = read_movielens_dat(path)
    assert len(df) == 3 and df["timestamp"].tolist() == [300, 200, 100]


def test_movielens_dat_without_final_newline(tmp_path):
    df = read_movielens_dat(write(tmp_path / "r.dat", ML_DAT.rstrip("\n")))
    assert len(df) == 3


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("3::30::4", "expected 4 fields separated by '::', got 3"),
        ("3::30::4::5::6", "expected 4 fields separated by '::', got 5"),
        ("x3::30::4::500", "user id 'x3' is not a non-negative integer"),
        ("3::3.0::4::500", "movie id '3.0' is not a non-negative integer"),
        ("3::30::four::500", "rating 'four' is not a finite number"),
        ("3::30::nan::500", "rating 'nan' is not a finite number"),
        ("3::30::4::5e2", "timestamp '5e2' is not an integer"),
        ("3::30::4::", "empty timestamp"),
        ("", "empty line"),
        ("3:30::4::500", "expected 4 fields separated by '::', got 3"),
        ("3\t30\t4\t500", "expected 4 fields separated by '::', got 1"),
    ],
)
def test_movielens_dat_bad_row_in_the_middle(tmp_path, bad_line, reason):
    lines = ML_DAT.splitlines()
    lines.insert(2, bad_line)  # becomes line 3
    path = write(tmp_path / "ratings.dat", "\n".join(lines) + "\n")
    with pytest.raises(BadRowError) as info:
        read_movielens_dat(path)
    err = info.value
    assert f"ratings.dat:3: {reason}" in str(err)
    assert err.line == 3 and err.reason == reason and err.path == str(path)


def test_bad_row_in_gz_file_and_skip(tmp_path):
    rows = [f"{u}::{u * 10}::3::{1000 + u}" for u in range(1, 301)]
    rows[149] = "150::1500::3"  # line 150
    rows[199] = "bad"  # line 200
    path = write(tmp_path / "ratings.dat.gz", "\n".join(rows) + "\n", gz=True)
    with pytest.raises(BadRowError, match=r"ratings\.dat\.gz:150: expected 4 fields"):
        read_movielens_dat(path)
    with pytest.warns(SkippedRowsWarning, match=r"skipped 2 malformed row\(s\) in .*ratings\.dat\.gz"):
        df = read_movielens_dat(path, on_bad_rows="skip")
    assert len(df) == 298 and df.attrs["bad_rows"] == 2
    assert "150" not in set(df["user"]) and "200" not in set(df["user"])
    assert df["user"].tolist()[:3] == ["1", "2", "3"]  # order kept
    assert df["timestamp"].tolist()[-1] == 1300


def test_header_line_rejected_where_format_has_none(tmp_path):
    path = write(tmp_path / "ratings.dat", "UserID::MovieID::Rating::Timestamp\n" + ML_DAT)
    with pytest.raises(BadRowError, match=r"ratings\.dat:1: user id 'UserID'"):
        read_movielens_dat(path)
    path = write(tmp_path / "u.data", "user\titem\trating\ttimestamp\n1\t2\t3\t4\n")
    with pytest.raises(BadRowError, match=r"u\.data:1: "):
        read_ml100k(path)


def test_invalid_on_bad_rows_value(tmp_path):
    path = write(tmp_path / "ratings.dat", ML_DAT)
    for fn in (read_movielens_dat, read_ml100k, read_movielens_csv):
        with pytest.raises(ValueError, match="on_bad_rows"):
            fn(path, on_bad_rows="ignore")
    with pytest.raises(ValueError, match="on_bad_rows"):
        read_sequences(path, on_bad_rows="warn")
    with pytest.raises(ValueError, match="on_bad_rows"):
        read_table(path, user=0, item=1, header=False, on_bad_rows=None)


@pytest.mark.parametrize("gz", [False, True])
def test_ml100k(tmp_path, gz):
    path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n", gz=gz)
    df = read_ml100k(path)
    assert_interaction_dtypes(df)
    assert df["user"].tolist() == ["196", "186"] and df["item"].tolist() == ["242", "302"]
    assert df["timestamp"].tolist() == [881250949, 891717742]


def test_ml100k_stray_space_is_a_bad_row(tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n1\t 5\t3\t4\n")
    with pytest.raises(BadRowError, match=r"u\.data:2: movie id ' 5'"):
        read_ml100k(path)
    with pytest.warns(SkippedRowsWarning):
        assert len(read_ml100k(path, on_bad_rows="skip")) == 1


ML_CSV = "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,3,0.5,964981247\r\n2,1,5,1\r\n"


@pytest.mark.parametrize("gz", [False, True])
def test_movielens_csv(tmp_path, gz):
    df = read_movielens_csv(write(tmp_path / "ratings.csv", ML_CSV, gz=gz))
    assert_interaction_dtypes(df)
    assert df["user"].tolist() == ["1", "1", "2"]
    assert df["rating"].tolist() == [4.0, 0.5, 5.0]
    assert df["timestamp"].tolist() == [964982703, 964981247, 1]


def test_movielens_csv_bad_row_line_counts_the_header(tmp_path):
    text = ML_CSV.replace("1,3,0.5,964981247", "1,3,0.5,96498x247")  # data row 2 = line 3
    with pytest.raises(BadRowError, match=r"ratings\.csv:3: timestamp '96498x247' is not an integer"):
        read_movielens_csv(write(tmp_path / "ratings.csv", text))
    text = ML_CSV + "3,4,2.5\r\n"  # line 5
    with pytest.raises(BadRowError, match=r"ratings\.csv:5: expected 4 fields separated by ','"):
        read_movielens_csv(write(tmp_path / "ratings.csv", text))


def test_movielens_csv_requires_its_header(tmp_path):
    text = ML_CSV.split("\r\n", 1)[1]
    with pytest.raises(BadRowError, match=r"ratings\.csv:1: expected header 'userId,movieId,rating,timestamp'"):
        read_movielens_csv(write(tmp_path / "ratings.csv", text))
    # a header cannot be skipped away
    with pytest.raises(BadRowError):
        read_movielens_csv(write(tmp_path / "ratings.csv", text), on_bad_rows="skip")


def test_empty_file(tmp_path):
    df = read_movielens_dat(write(tmp_path / "ratings.dat", ""))
    assert len(df) == 0 and list(df.columns) == ["user", "item", "timestamp", "rating"]
    assert_interaction_dtypes(df)


def test_bad_row_error_is_picklable():
    err = BadRowError("a/ratings.dat", 17, "expected 4 fields separated by '::', got 3")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == "a/ratings.dat:17: expected 4 fields separated by '::', got 3"
    assert (again.path, again.line, again.reason) == (err.path, err.line, err.reason)
    assert isinstance(again, ValueError)


def test_large_file_fast_path_equals_line_scan(tmp_path):
    """The vectorised path and the line-by-line path (forced by one bad row) agree."""
    rng = np.random.default_rng(0)
    n = 5000
    users = rng.integers(1, 100, n)
    items = rng.integers(1, 500, n)
    ts = rng.integers(9 * 10**8, 10**9, n)
    ratings = rng.integers(1, 6, n)
    lines = [f"{u}::{i}::{r}::{t}" for u, i, r, t in zip(users, items, ratings, ts)]
    good = read_movielens_dat(write(tmp_path / "good.dat", "\n".join(lines) + "\n"))
    assert len(good) == n
    with_bad = lines[:2500] + ["oops"] + lines[2500:]
    with pytest.warns(SkippedRowsWarning):
        skipped = read_movielens_dat(write(tmp_path / "bad.dat", "\n".join(with_bad) + "\n"), on_bad_rows="skip")
    pd.testing.assert_frame_equal(good, skipped)
    assert good["timestamp"].tolist() == ts.tolist()


# ----------------------------------------------------------------------------- read_table


def test_read_table_tsv_without_header_by_position(tmp_path):
    path = write(tmp_path / "log.tsv", "u1\tpv\ti9\t100\nu2\tbuy\ti8\t50\n")
    df = read_table(path, user=0, item=2, event=1, timestamp=3, header=False)
    assert list(df.columns) == ["user", "item", "timestamp", "event"]
    assert_interaction_dtypes(df)
    assert df["user"].tolist() == ["u1", "u2"] and df["event"].tolist() == ["pv", "buy"]
    assert df["timestamp"].tolist() == [100, 50]


@pytest.mark.parametrize("gz", [False, True])
def test_read_table_csv_with_header_by_name(tmp_path, gz):
    text = 'uid,iid,score,when\nA, x1 ,4.5,10\nB,"item, with comma",3,20\n'
    path = write(tmp_path / ("t.csv.gz" if gz else "t.csv"), text, gz=gz)
    df = read_table(path, user="uid", item="iid", rating="score", timestamp="when")
    assert_interaction_dtypes(df)
    assert df["item"].tolist() == ["x1", "item, with comma"]  # stripped, quotes understood
    assert df["rating"].tolist() == [4.5, 3.0]


def test_read_table_without_timestamp_has_no_timestamp_column(tmp_path):
    df = read_table(write(tmp_path / "t.csv", "u,i\n1,2\n1,3\n"), user="u", item="i")
    assert list(df.columns) == ["user", "item"]


def test_read_table_semicolon(tmp_path):
    text = "user;item;ts\n1;a;5\n2;b;6\n"
    sniffed = read_table(write(tmp_path / "t.csv", text), user="user", item="item", timestamp="ts")
    explicit = read_table(write(tmp_path / "t.txt", text), user="user", item="item", timestamp="ts", sep=";")
    pd.testing.assert_frame_equal(sniffed, explicit)
    assert sniffed["item"].tolist() == ["a", "b"] and sniffed["timestamp"].tolist() == [5, 6]


def test_read_table_multichar_and_sniffed_separators(tmp_path):
    df = read_table(write(tmp_path / "x.dat", "1::2::3\n4::5::6\n"), user=0, item=1, timestamp=2, header=False)
    assert df["item"].tolist() == ["2", "5"]
    df = read_table(write(tmp_path / "x.txt", "1|2|3\n4|5|6\n"), user=0, item=1, header=False)
    assert df["user"].tolist() == ["1", "4"]


def test_read_table_bad_rows_with_header_offset(tmp_path):
    text = "u\ti\tt\n1\ta\t5\n2\tb\n3\tc\t7\n"  # line 3 is short
    path = write(tmp_path / "t.tsv", text)
    with pytest.raises(BadRowError, match=r"t\.tsv:3: expected 3 fields separated by '\\t', got 2"):
        read_table(path, user="u", item="i", timestamp="t")
    with pytest.warns(SkippedRowsWarning, match="skipped 1"):
        df = read_table(path, user="u", item="i", timestamp="t", on_bad_rows="skip")
    assert df["user"].tolist() == ["1", "3"] and df.attrs["bad_rows"] == 1
    # a short row is bad even when the missing column is not used
    with pytest.raises(BadRowError, match=r":3: "):
        read_table(path, user="u", item="i")


def test_read_table_quoted_newline_keeps_line_numbers(tmp_path):
    text = 'u,i,r\n1,"multi\nline",4\n2,x,notanumber\n'
    with pytest.raises(BadRowError, match=r"t\.csv:4: rating 'notanumber' is not a finite number"):
        read_table(write(tmp_path / "t.csv", text), user="u", item="i", rating="r")


def test_read_table_empty_id_and_empty_line(tmp_path):
    path = write(tmp_path / "t.csv", "u,i\n1,a\n , b\n")
    with pytest.raises(BadRowError, match=r"t\.csv:3: empty user id"):
        read_table(path, user="u", item="i")
    path = write(tmp_path / "t.csv", "u,i\n1,a\n\n2,b\n")
    with pytest.raises(BadRowError, match=r"t\.csv:3: empty line"):
        read_table(path, user="u", item="i")


def test_read_table_invalid_utf8_reports_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"u,i\n1,a\n2,\xff\xfe\n3,c\n")
    with pytest.raises(BadRowError, match=r"t\.csv:3: invalid UTF-8"):
        read_table(path, user="u", item="i")


def test_read_table_iso_timestamps(tmp_path):
    text = "u,i,t\n1,a,2017-11-26 09:00:00\n1,b,2017-11-26T09:00:01Z\n2,c,2017-11-26 10:00:00+01:00\n"
    df = read_table(write(tmp_path / "t.csv", text), user="u", item="i", timestamp="t")
    assert df["timestamp"].tolist() == [1511686800, 1511686801, 1511686800]
    bad = text + "2,d,yesterday\n"
    with pytest.raises(BadRowError, match=r"t\.csv:5: timestamp 'yesterday' is not an ISO-8601"):
        read_table(write(tmp_path / "t.csv", bad), user="u", item="i", timestamp="t")


def test_read_table_column_errors(tmp_path):
    path = write(tmp_path / "t.csv", "u,i\n1,2\n")
    with pytest.raises(ValueError, match="'user_id' not found in header"):
        read_table(path, user="user_id", item="i")
    with pytest.raises(ValueError, match="header=False"):
        read_table(path, user="u", item="i", header=False)
    with pytest.raises(ValueError, match="out of range"):
        read_table(path, user=0, item=5, header=False)


def test_read_table_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    src = pd.DataFrame(
        {
            "uid": np.array([3, 1, 2], dtype=np.int64),
            "iid": ["b", "a", "c"],
            "when": pd.to_datetime(["2020-01-01 00:00:01", "2020-01-01 00:00:00", "1970-01-01 00:01:00"]),
            "stars": [1.5, 2.0, 3.0],
        }
    )
    path = tmp_path / "log.parquet"
    src.to_parquet(path, index=False)
    df = read_table(path, user="uid", item="iid", timestamp="when", rating="stars")
    assert_interaction_dtypes(df)
    assert df["user"].tolist() == ["3", "1", "2"]
    assert df["timestamp"].tolist() == [1577836801, 1577836800, 60]
    assert df["rating"].tolist() == [1.5, 2.0, 3.0]
    # integer timestamps, positions, and a null row
    src2 = pd.DataFrame({"u": ["x", None, "z"], "i": [1, 2, 3], "t": [5, 6, 7]})
    path2 = tmp_path / "log2.pq"
    src2.to_parquet(path2, index=False)
    with pytest.raises(BadRowError, match=r"log2\.pq:2: .*user id"):
        read_table(path2, user=0, item=1, timestamp=2)
    with pytest.warns(SkippedRowsWarning):
        df2 = read_table(path2, user=0, item=1, timestamp=2, on_bad_rows="skip")
    assert df2["user"].tolist() == ["x", "z"] and df2["timestamp"].tolist() == [5, 7]
    assert df2.attrs["bad_rows"] == 1


def test_read_table_warns_about_millisecond_timestamps(tmp_path):
    path = write(tmp_path / "t.csv", "u,i,t\n1,2,1649581149287\n")
    with pytest.warns(UserWarning, match="milliseconds"):
        read_table(path, user="u", item="i", timestamp="t")


# ----------------------------------------------------------------------------- sequences

SEQ = "1 10 11 12\n2 20\n3 30 10 31\n"
SEQ_TS = "1 100 100 200\n2 50\n3 10 20 30\n"


@pytest.mark.parametrize("gz", [False, True])
def test_read_sequences(tmp_path, gz):
    path = write(tmp_path / ("Beauty.txt.gz" if gz else "Beauty.txt"), SEQ, gz=gz)
    df = read_sequences(path)
    assert list(df.columns) == ["user", "item"]
    assert_interaction_dtypes(df)
    assert df["user"].tolist() == ["1", "1", "1", "2", "3", "3", "3"]
    assert df["item"].tolist() == ["10", "11", "12", "20", "30", "10", "31"]
    assert df.attrs["source"] == str(path) and df.attrs["bad_rows"] == 0


def test_read_sequences_with_timestamps(tmp_path):
    seq = write(tmp_path / "Beauty.txt", SEQ)
    ts = write(tmp_path / "Beauty_time.txt", SEQ_TS, gz=True)
    df = read_sequences(seq, ts)
    assert list(df.columns) == ["user", "item", "timestamp"]
    assert_interaction_dtypes(df)
    assert df["timestamp"].tolist() == [100, 100, 200, 50, 10, 20, 30]


def test_read_sequences_pair_per_line_format(tmp_path):
    df = read_sequences(write(tmp_path / "ml-1m.txt", "1 5\n1 6\n2 7\n1 8\n"))
    assert df["user"].tolist() == ["1", "1", "2", "1"] and df["item"].tolist() == ["5", "6", "7", "8"]


@pytest.mark.parametrize(
    "ts_text, line, reason",
    [
        ("1 100 100 200\n9 50\n3 10 20 30\n", 2, "user '9' does not match user '2' on line 2 of Beauty.txt"),
        ("1 100 100\n2 50\n3 10 20 30\n", 1, "2 timestamps for user '1', but line 1 of Beauty.txt has 3 items"),
        ("1 100 100 200\n2 50\n", 3, "missing line: the timestamp file has 2 lines, Beauty.txt has 3"),
        ("1 100 100 200\n2 50\n3 10 20 30\n4 1\n", 4, "extra line"),
        ("1 100 100 200\n2 5x\n3 10 20 30\n", 2, "timestamp '5x' (position 1) is not an integer"),
        ("1 100 100 200\n2 50\n3 10 30 20\n", 3, "timestamps decrease at position 3"),
    ],
)
def test_read_sequences_misaligned_timestamps(tmp_path, ts_text, line, reason):
    seq = write(tmp_path / "Beauty.txt", SEQ)
    ts = write(tmp_path / "Beauty_time.txt", ts_text)
    with pytest.raises(BadRowError) as info:
        read_sequences(seq, ts)
    assert info.value.path == str(ts) and info.value.line == line
    assert f"Beauty_time.txt:{line}: {reason}" in str(info.value)


def test_read_sequences_skip_drops_the_misaligned_line(tmp_path):
    seq = write(tmp_path / "Beauty.txt", SEQ)
    ts = write(tmp_path / "Beauty_time.txt", "1 100 100 200\n9 50\n3 10 20 30\n")
    with pytest.warns(SkippedRowsWarning, match=r"skipped 1 .*Beauty_time\.txt:2"):
        df = read_sequences(seq, ts, on_bad_rows="skip")
    assert "2" not in set(df["user"]) and len(df) == 6 and df.attrs["bad_rows"] == 1


def test_read_sequences_bad_lines(tmp_path):
    with pytest.raises(BadRowError, match=r"Beauty\.txt:2: empty line"):
        read_sequences(write(tmp_path / "Beauty.txt", "1 2 3\n\n2 4\n"))
    with pytest.raises(BadRowError, match=r"Beauty\.txt:3: user '7' has no items"):
        read_sequences(write(tmp_path / "Beauty.txt", "1 2 3\n2 4\n7\n"))
    # trailing blank lines are fine
    assert len(read_sequences(write(tmp_path / "Beauty.txt", "1 2 3\n2 4\n\n\n"))) == 3


# ----------------------------------------------------------------------------- titles


def test_read_titles_movies_dat_latin1(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_bytes(
        "1::Toy Story (1995)::Animation\n73::Misérables, Les (1995)::Drama\n".encode("latin-1")
    )
    assert read_titles(path) == {"1": "Toy Story (1995)", "73": "Misérables, Les (1995)"}


def test_read_titles_u_item(tmp_path):
    path = tmp_path / "u.item"
    path.write_bytes(
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n2|Café (1995)|01-Jan-1995||http://y|1|0\n".encode("latin-1")
    )
    assert read_titles(path) == {"1": "Toy Story (1995)", "2": "Café (1995)"}


@pytest.mark.parametrize("gz", [False, True])
def test_read_titles_movies_csv(tmp_path, gz):
    text = 'movieId,title,genres\r\n1,Toy Story (1995),Comedy\r\n11,"American President, The (1995)",Comedy|Drama\r\n'
    titles = read_titles(write(tmp_path / "movies.csv", text, gz=gz))
    assert titles == {"1": "Toy Story (1995)", "11": "American President, The (1995)"}


def test_read_titles_errors(tmp_path):
    with pytest.raises(BadRowError, match=r"movies\.dat:2: expected 3 fields"):
        read_titles(write(tmp_path / "movies.dat", "1::A::G\n2::B\n"))
    with pytest.raises(BadRowError, match=r"movies\.dat:2: item '1' already has title"):
        read_titles(write(tmp_path / "movies.dat", "1::A::G\n1::B::G\n"))
    with pytest.raises(ValueError, match="unrecognised titles format"):
        read_titles(write(tmp_path / "titles.txt", "hello world\n"))


def test_no_warning_on_clean_input(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_movielens_dat(write(tmp_path / "ratings.dat", ML_DAT))
        read_sequences(write(tmp_path / "Beauty.txt", SEQ))


# ----------------------------------------------------------------------------- DataFrames


def test_read_frame_converts_datetimes_of_any_unit_and_zone_to_seconds():
    stamps = pd.to_datetime(["2020-01-01 00:00:00", "2020-01-02 00:00:01.700"], format="ISO8601")
    expected = [1577836800, 1577923201]  # sub-second parts are floored
    for unit in ("s", "ms", "us", "ns"):
        frame = pd.DataFrame({"u": ["a", "a"], "i": [1, 2], "t": stamps.as_unit(unit)})
        assert read_frame(frame, user="u", item="i", timestamp="t")["timestamp"].tolist() == expected
        aware = frame.assign(t=frame["t"].dt.tz_localize("UTC").dt.tz_convert("America/New_York"))
        assert read_frame(aware, user="u", item="i", timestamp="t")["timestamp"].tolist() == expected
    ints = pd.DataFrame({"u": [1, 1], "i": [3.0, 4.0], "t": expected})
    df = read_frame(ints, user="u", item="i", timestamp="t")
    assert df["user"].tolist() == ["1", "1"] and df["item"].tolist() == ["3", "4"]
    assert_interaction_dtypes(df)


def test_read_frame_names_the_row_of_a_missing_value():
    frame = pd.DataFrame({"u": ["a", "b", None], "i": [1.0, float("nan"), 3.0]}, index=[10, 20, 30])
    with pytest.raises(BadRowError, match=r"DataFrame:2: missing or invalid item id \(column 'i'\): missing .*row 2 of the DataFrame, index 20"):
        read_frame(frame, user="u", item="i")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRowsWarning)
        df = read_frame(frame, user="u", item="i", on_bad_rows="skip")
    assert df["user"].tolist() == ["a"] and df.attrs["bad_rows"] == 2
    timed = pd.DataFrame({"u": ["a", "a"], "i": [1, 2], "t": pd.to_datetime([None, "2020-01-01"])})
    with pytest.raises(BadRowError, match="DataFrame:1: missing or non-integer timestamp"):
        read_frame(timed, user="u", item="i", timestamp="t")


def test_read_frame_column_errors():
    frame = pd.DataFrame([[1, 2, 3]], columns=["u", "i", "i"])
    with pytest.raises(ValueError, match=r"no column 'x' for user; the columns are \['u', 'i', 'i'\]"):
        read_frame(frame, user="x", item="u")
    with pytest.raises(ValueError, match="'i' for item is ambiguous: 2 columns"):
        read_frame(frame, user="u", item="i")
    with pytest.raises(ValueError, match="given for both user and item"):
        read_frame(frame, user="u", item="u")
    with pytest.raises(TypeError):
        read_frame([[1, 2]], user=0, item=1)
