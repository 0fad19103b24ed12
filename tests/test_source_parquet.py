"""ParquetSource: rows of files written by pyarrow, equal to pyarrow's own reading, by row group."""

from __future__ import annotations

import json

import cloudpickle
import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch.sources.parquet import ParquetSource  # noqa: E402


def write_files(tmp_path, files=3, rows=25, row_group_size=7):
    """Files with numeric, string, binary, list, fixed-size list and struct columns (some nulls)."""
    paths = []
    for f in range(files):
        base = f * rows
        ids = list(range(base, base + rows))
        table = pa.table({
            "id": pa.array(ids, pa.int64()),
            "score": pa.array([np.float32(i / 4) for i in ids], pa.float32()),
            "small": pa.array([i % 100 for i in ids], pa.int16()),
            "flag": pa.array([i % 3 == 0 for i in ids]),
            "name": pa.array([f"row{i}" for i in ids]),
            "blob": pa.array([bytes([i % 256]) * (i % 5) for i in ids], pa.binary()),
            "tokens": pa.array([list(range(i % 6)) for i in ids], pa.list_(pa.int32())),
            "vec": pa.array([[i, i + 0.5, -i] for i in ids], pa.list_(pa.float64(), 3)),
            "words": pa.array([[f"w{j}" for j in range(i % 3)] for i in ids]),
            "meta": pa.array([{"a": i, "b": f"m{i}"} for i in ids]),
            "maybe": pa.array([None if i % 4 == 0 else i for i in ids], pa.int32()),
        })
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(str(path))
    return paths


def expected(row: dict, schema) -> dict:
    """pyarrow's Python row as ParquetSource documents it (numbers numpy scalars, lists arrays)."""
    out = {}
    for name, value in row.items():
        t = schema.field(name).type
        if value is None:
            out[name] = None
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out[name] = np.array(value, t.to_pandas_dtype())[()]
        elif (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_primitive(t.value_type):
            out[name] = np.array(value, t.value_type.to_pandas_dtype())
        else:
            out[name] = value
    return out


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray | np.generic):
            assert isinstance(got[key], type(value)), (key, type(got[key]), type(value))
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value)
        else:
            assert type(got[key]) is type(value) and got[key] == value, (key, got[key], value)


def test_items_equal_pyarrows_rows_across_files_and_row_groups(tmp_path):
    paths = write_files(tmp_path)
    table = pq.read_table(paths)
    rows = table.to_pylist()
    source = ParquetSource(str(tmp_path / "*.parquet"))
    assert len(source) == len(rows) == 75
    for i in range(len(rows)):
        assert_same(source[i], expected(rows[i], table.schema))
    order = list(np.random.default_rng(0).permutation(75)) + [3, 3, -1]
    for got, i in zip(source.__getitems__(order), order, strict=True):
        assert_same(got, expected(rows[i], table.schema))


def test_list_columns_are_numpy_arrays_of_the_list_dtype(tmp_path):
    source = ParquetSource(write_files(tmp_path, files=1), columns=["tokens", "vec"])
    item = source[5]
    assert isinstance(item["tokens"], np.ndarray) and item["tokens"].dtype == np.int32
    assert item["tokens"].tolist() == [0, 1, 2, 3, 4]
    assert isinstance(item["vec"], np.ndarray) and item["vec"].dtype == np.float64 and item["vec"].shape == (3,)
    assert list(item) == ["tokens", "vec"]


def test_a_rows_value_does_not_depend_on_the_nulls_of_its_batch(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({
        "l": pa.array([[1, None], [2, 3], [], None, [4, None, 5]], pa.list_(pa.int64())),
        "fixed": pa.array([[1.0, None], [2.0, 3.0], [4.0, 5.0], None, [None, 6.0]], pa.list_(pa.float32(), 2)),
        "nested": pa.array([[[1, None]], [[2]], [], [None], [[3], [4, 5]]], pa.list_(pa.list_(pa.int8()))),
    }), path)
    source = ParquetSource(path)
    alone = [source[i] for i in range(5)]
    assert isinstance(alone[1]["l"], np.ndarray) and alone[1]["l"].dtype == np.int64
    assert alone[0]["l"] == [1, None] and alone[3]["l"] is None
    rng = np.random.default_rng(0)
    for order in [list(rng.permutation(5)) for _ in range(4)] + [[0, 1], [1, 4], [2, 3]]:
        for i, got in zip(order, source.__getitems__(order), strict=True):
            for key, value in alone[i].items():
                assert type(got[key]) is type(value), (i, key, got[key], value)
                assert repr(got[key]) == repr(value), (i, key)


def test_each_row_group_is_read_once_per_batch(tmp_path, monkeypatch):
    source = ParquetSource(write_files(tmp_path, files=2), cache_bytes=0)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: reads.append(g) or real(self, g, **kw))
    items = source.__getitems__([0, 30, 1, 2, 31, 6])  # file 0 groups 0, 0, 0, 0; file 1 group 0 (rows 25..31)
    assert [int(x["id"]) for x in items] == [0, 30, 1, 2, 31, 6]
    assert len(reads) == 2


def test_the_row_group_cache_stays_within_its_bound(tmp_path):
    paths = write_files(tmp_path, files=2, rows=200, row_group_size=20)
    one_group = pq.ParquetFile(paths[0]).read_row_group(0).nbytes
    source = ParquetSource(paths, cache_bytes=int(one_group * 2.5))
    for i in np.random.default_rng(1).permutation(len(source))[:120]:
        source[int(i)]
        assert 0 < source.cached_bytes() <= source.cache_bytes
    assert source.cached_bytes() >= one_group * 2 - 64
    none = ParquetSource(paths, cache_bytes=0)
    none[0]
    assert none.cached_bytes() == 0


def test_lengths_of_a_list_column_come_from_that_column(tmp_path):
    paths = write_files(tmp_path, files=2)
    source = ParquetSource(paths, length_columns=("tokens",))
    want = [i % 6 for i in range(50)]
    assert source.lengths()["tokens"].tolist() == want
    assert source.lengths("words").tolist() == [i % 3 for i in range(50)]
    assert ParquetSource(paths).lengths() is None


def test_pack_batching_takes_its_lengths_from_the_source(tmp_path):
    paths = write_files(tmp_path, files=1)

    class Counted(ParquetSource):
        asked = 0

        def lengths(self, column=None):
            Counted.asked += 1
            return super().lengths(column)

    source = Counted(paths, columns=["tokens"], length_columns=("tokens",))
    with ap.Loader(source, 2, workers=0, batching=ap.Pack(8, method="first_fit")) as loader:
        batches = list(loader)
    assert Counted.asked >= 1
    assert sum(int(np.sum(b["tokens_segment_ids"] != 0)) for b in batches) == sum(i % 6 for i in range(25))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_equal_for_any_worker_count_and_resume_exactly(tmp_path, workers):
    paths = write_files(tmp_path)
    source = ParquetSource(paths, columns=["id", "score", "vec", "name"])
    kw = dict(shuffle=True, seed=5, epochs=2)

    with ap.Loader(source, 8, workers=0, **kw) as loader:
        reference = [(b["id"].tolist(), b["vec"].copy(), list(b["name"])) for b in loader]
    with ap.Loader(source, 8, workers=workers, **kw) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        head = [(b["id"].tolist(), b["vec"].copy(), list(b["name"])) for b in head]
        state = json.loads(json.dumps(loader.state_dict()))
    with ap.Loader(source, 8, workers=workers, **kw) as loader:
        loader.load_state_dict(state)
        rest = [(b["id"].tolist(), b["vec"].copy(), list(b["name"])) for b in loader]
    got = head + rest
    assert [g[0] for g in got] == [r[0] for r in reference]
    for g, r in zip(got, reference, strict=True):
        np.testing.assert_array_equal(g[1], r[1])
        assert g[2] == r[2]


def test_s3_files_read_the_same_as_local_ones(tmp_path, s3):
    paths = write_files(tmp_path, files=2)
    urls = [s3.upload(p, f"pq/{i}.parquet") for i, p in enumerate(paths)]
    local, remote = ParquetSource(paths), ParquetSource(s3.url("pq/*.parquet"))
    assert remote.paths == urls and len(remote) == len(local)
    order = list(np.random.default_rng(2).permutation(len(local)))
    for a, b in zip(local.__getitems__(order), remote.__getitems__(order), strict=True):
        assert_same(b, a)
    remote_ids = ParquetSource(s3.url("pq/*.parquet"), columns=["id", "vec"])
    with ap.Loader(remote_ids, 10, workers=2, shuffle=True, seed=1) as loader:
        got = sorted(int(i) for b in loader for i in b["id"])
    assert got == list(range(50))


def test_a_missing_column_names_the_file_and_its_columns(tmp_path):
    paths = write_files(tmp_path, files=1)
    with pytest.raises(ValueError, match=r"column 'label' is not in .*part-0.parquet, which has columns \['id', "):
        ParquetSource(paths, columns=["id", "label"])


def test_a_truncated_file_is_refused_naming_it_and_the_remedy(tmp_path):
    paths = write_files(tmp_path, files=2)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read the Parquet footer of .*part-1.parquet: .*truncated or not "
                                         r"Parquet: write it again"):
        ParquetSource(paths)


def corrupt_first_page(path, row_group=1):
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    with open(path, "r+b") as f:
        f.seek(column.data_page_offset)
        f.write(b"\xff" * 24)


def test_a_corrupt_row_group_names_its_rows_and_on_error_skip_leaves_them_out(tmp_path):
    paths = write_files(tmp_path, files=1, rows=21, row_group_size=7)
    corrupt_first_page(paths[0], row_group=1)
    source = ParquetSource(paths, columns=["id"])
    assert int(source[0]["id"]) == 0
    with pytest.raises(ValueError, match=r"cannot read row group 1 \(rows 7..13\) of .*part-0.parquet: .*corrupt: "
                                         "write it again, or pass on_error='skip'"):
        source[8]
    with ap.Loader(source, 3, workers=0, on_error="skip") as loader:
        got = [int(i) for b in loader for i in b["id"]]
    assert got == list(range(7)) + list(range(14, 21))


def test_a_file_changed_after_the_source_was_made_is_refused(tmp_path):
    paths = write_files(tmp_path, files=1, rows=10, row_group_size=5)
    source = ParquetSource(paths)
    pq.write_table(pq.read_table(paths[0]), paths[0], row_group_size=3)
    with pytest.raises(ValueError, match=r"changed since this ParquetSource was made: its row groups hold \[3, 3, 3, "
                                         r"1\] rows, not \[5, 5\]. Make the source again"):
        source[0]


def test_a_file_rewritten_with_the_same_row_groups_is_refused_in_every_process(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": np.arange(10)}), path, row_group_size=5)
    source = ParquetSource(path)
    pq.write_table(pa.table({"x": np.arange(10) + 1000}), path, row_group_size=5)
    with pytest.raises(ValueError, match=r"a.parquet changed since this ParquetSource was made: it is \{'size'.*"
                                         r"Make the source again"):
        cloudpickle.loads(cloudpickle.dumps(source))[3]


def test_files_whose_column_types_differ_are_refused_naming_both(tmp_path):
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int32()), "y": [1, 2]}), str(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"x": pa.array([3, 4], pa.int64()), "y": [3, 4]}), str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"b.parquet has other column types than .*a.parquet \(x: int64 here, int32 "
                                         r"in .*a.parquet\), so their rows cannot share a batch: write the files"):
        ParquetSource(str(tmp_path / "*.parquet"))
    assert [int(r["y"]) for r in ParquetSource(str(tmp_path / "*.parquet"), columns=["y"]).__getitems__([0, 2])] == [1, 3]


def test_files_differing_only_in_nullability_share_a_batch(tmp_path):
    required = pa.schema([pa.field("x", pa.int64(), nullable=False)])
    pq.write_table(pa.table({"x": [1, 2]}), str(tmp_path / "a.parquet"))
    pq.write_table(pa.Table.from_arrays([pa.array([3, 4])], schema=required), str(tmp_path / "b.parquet"))
    source = ParquetSource(str(tmp_path / "*.parquet"))
    assert [int(r["x"]) for r in source.__getitems__([0, 2, 3])] == [1, 3, 4]


@pytest.fixture
def few_descriptors():
    """This process may open 256 files while the test runs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_open_files_are_bounded_per_process(tmp_path, few_descriptors):
    from agnostic_prefetch.sources.parquet import MAX_OPEN_FILES

    for i in range(300):
        pq.write_table(pa.table({"x": [i]}), str(tmp_path / f"p{i:04d}.parquet"))
    source = ParquetSource(str(tmp_path / "p*.parquet"))
    try:
        assert [int(r["x"]) for r in source.__getitems__(list(range(300)))] == list(range(300))
        held = sum(open_descriptors(tmp_path / f"p{i:04d}.parquet") for i in range(300))
        assert held == MAX_OPEN_FILES
    finally:
        source.release()


def test_too_many_open_files_is_not_called_corruption(tmp_path, few_descriptors):
    paths = write_files(tmp_path, files=1)
    source = ParquetSource(paths)
    hogs = []
    try:
        with pytest.raises(OSError, match="Too many open files"):
            while True:
                hogs.append(open(paths[0], "rb"))  # noqa: SIM115 (every descriptor taken on purpose)
        with pytest.raises(OSError, match=r"cannot open .*part-0.parquet: .*Too many open files.*raise the limit "
                                          r"\(ulimit -n\)") as caught:
            source[0]
        assert "corrupt" not in str(caught.value) and "truncated" not in str(caught.value)
    finally:
        for f in hogs:
            f.close()
        source.release()


def open_descriptors(path) -> int:
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            continue
    return count


def test_it_pickles_after_a_read_and_release_closes_everything(tmp_path):
    paths = write_files(tmp_path, files=1)
    source = ParquetSource(paths)
    first = source[3]
    assert open_descriptors(paths[0]) == 1 and source.cached_bytes() > 0
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    assert_same(copy[3], first)
    copy.release()
    source.release()
    assert open_descriptors(paths[0]) == 0 and source.cached_bytes() == 0
    assert_same(source[3], first)
    source.release()


def test_repr_and_locate_say_what_is_read(tmp_path):
    source = ParquetSource(write_files(tmp_path, files=2), columns=["id"])
    assert repr(source).startswith("ParquetSource(50 rows in 8 row groups of 2 files (")
    assert source.locate(30).endswith("part-1.parquet, row group 0, row 5")
    with pytest.raises(IndexError, match="row 50 is out of range for 50 rows"):
        source[50]
