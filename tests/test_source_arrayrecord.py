"""ArrayRecordSource: files written by array_record's own writer read back equal to its
ArrayRecordDataSource, locally and through a local S3 server; decoders; the loader; bad data."""

from __future__ import annotations

import logging
import os
import threading

import cloudpickle
import numpy as np
import pytest
from tf_example_messages import assert_items_equal, build_example, reference_items

import agnostic_prefetch as ap
from agnostic_prefetch.sources.arrayrecord import ArrayRecordSource

array_record_module = pytest.importorskip("array_record.python.array_record_module",
                                          reason="the ArrayRecord tests need array-record (the test extra)")


def write(path, records: list[bytes], options: str = "group_size:1") -> str:
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for record in records:
        writer.write(record)
    writer.close()
    return str(path)


def data_source(paths):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    return ArrayRecordDataSource(paths)


def examples(start: int, count: int) -> list[bytes]:
    return [build_example({"i": ("int64", [i, -i]), "f": ("float", [i / 2, 1.5]),
                           "name": ("bytes", [b"r%d" % i])}) for i in range(start, start + count)]


@pytest.fixture
def two_files(tmp_path):
    rng = np.random.default_rng(0)
    a = write(tmp_path / "a.array_record", [rng.bytes(int(n)) for n in rng.integers(0, 300, 9)])
    b = write(tmp_path / "b.array_record", [rng.bytes(int(n)) for n in rng.integers(0, 300, 6)], "group_size:4")
    return [a, b]


def test_records_equal_array_records_own_data_source(two_files):
    source, reference = ArrayRecordSource(two_files), data_source(two_files)
    assert len(source) == len(reference) == 15
    for i in range(15):
        assert source[i] == {"bytes": reference[i]}
    order = [14, 0, 9, 9, 3, 10, 8]
    assert source.__getitems__(order) == [{"bytes": r} for r in reference.__getitems__(order)]


def test_records_through_the_s3_server_equal_local(s3, tmp_path, two_files, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    urls = [s3.upload(p, f"ar/{os.path.basename(p)}") for p in two_files]
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        remote = ArrayRecordSource(s3.url("ar/*.array_record"))
    assert remote.paths == urls and caplog.text.count("copied s3://") == 2
    assert os.listdir(tmp_path / "cache" / "agnostic_prefetch" / "arrayrecord")
    reference = data_source(two_files)
    order = list(range(15))[::-1]
    assert remote.__getitems__(order) == [{"bytes": reference[i]} for i in order]
    copy = cloudpickle.loads(cloudpickle.dumps(remote))  # a worker finds the copy in the cache
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        assert copy[3] == {"bytes": reference[3]}
    assert "copied" not in caplog.text
    s3.put("ar/a.array_record", open(two_files[1], "rb").read())  # the object changes
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()  # s3fs answers info() from its listing cache
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        assert len(ArrayRecordSource(urls)) == 12
    assert "changed since it was copied" in caplog.text


def test_decode_tf_example_parses_as_tfrecordsource_does(tmp_path):
    records = examples(0, 5)
    source = ArrayRecordSource(write(tmp_path / "e.array_record", records), decode="tf.train.Example")
    for i, record in enumerate(records):
        assert_items_equal(source[i], reference_items(record))
    assert [x["i"][0] for x in source.__getitems__([4, 1])] == [4, 1]


def test_decode_a_callable_gets_the_records_bytes(tmp_path):
    source = ArrayRecordSource(write(tmp_path / "x.array_record", [b"ab", b"cde"]), decode=len)
    assert [source[0], source[1]] == [2, 3] and "decode='len'" in repr(source)


def test_decode_anything_else_is_refused():
    with pytest.raises(ValueError, match="decode must be None, 'tf.train.Example' or a function"):
        ArrayRecordSource("x", decode="pickle")


def test_a_record_that_is_no_example_names_the_record(tmp_path):
    source = ArrayRecordSource(write(tmp_path / "x.array_record", [examples(0, 1)[0], b"\x0a\x09"]),
                               decode="tf.train.Example")
    with pytest.raises(ValueError, match=r"record 1 of .*x.array_record: not a valid tf.train.Example at byte 0"):
        source[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_equal_for_any_worker_count_and_resume_exactly(tmp_path, workers):
    paths = [write(tmp_path / "a.array_record", examples(0, 13)), write(tmp_path / "b.array_record", examples(13, 10))]
    source = ArrayRecordSource(paths, decode="tf.train.Example")

    def numeric(item, rng):
        return {"i": item["i"], "f": item["f"]}

    def run(loader_workers, state=None, take=None):
        with ap.Loader(source, 4, workers=loader_workers, shuffle=True, seed=5, transform=numeric) as loader:
            if state is not None:
                loader.load_state_dict(state)
            out = []
            for batch in loader:
                out.append({k: np.array(v) for k, v in batch.items()})
                if take is not None and len(out) == take:
                    return out, loader.state_dict()
            return out, None

    full, _ = run(0)
    got, _ = run(workers)
    head, state = run(workers, take=2)
    rest, _ = run(workers, state=state)
    assert sorted(np.concatenate([b["i"][:, 0] for b in full]).tolist()) == list(range(23))
    for a, b in zip(full, got, strict=True):
        np.testing.assert_array_equal(a["i"], b["i"])
        np.testing.assert_array_equal(a["f"], b["f"])
    for a, b in zip(full, head + rest, strict=True):
        np.testing.assert_array_equal(a["i"], b["i"])


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    path = write(tmp_path / "a.array_record", [b"x" * 100] * 10)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"a.array_record cannot be read as an ArrayRecord file .*truncated"):
        ArrayRecordSource(path)


def test_a_corrupt_chunk_names_the_record_and_the_loader_can_skip_it(tmp_path, caplog):
    records = examples(0, 8)
    path = write(tmp_path / "a.array_record", records, "group_size:1,uncompressed")
    data = bytearray(open(path, "rb").read())
    at = data.find(b"r5")  # a byte of record 5, in its own chunk
    assert at > 0 and data.find(b"r5", at + 1) < 0
    data[at] ^= 0xFF
    open(path, "wb").write(bytes(data))
    source = ArrayRecordSource(path, decode="tf.train.Example")
    with pytest.raises(ValueError, match=r"record 5 of .*a.array_record cannot be read: .*Corrupted.*on_error='skip'"):
        source[5]
    with ap.Loader(source, 3, workers=2, on_error="skip", transform=lambda item, rng: {"i": item["i"]}) as loader:
        ids = [int(i) for b in loader for i in np.array(b["i"])[:, 0]]
        assert loader.stats()["skipped"] == 1
    assert ids == [0, 1, 2, 3, 4, 6, 7]


def test_it_pickles_after_a_read_and_release_closes_its_readers(two_files):
    source = ArrayRecordSource(two_files)
    fds = len(os.listdir("/proc/self/fd"))
    first = source.__getitems__([0, 12])
    assert len(os.listdir("/proc/self/fd")) > fds  # a reader per file, open
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    assert copy.__getitems__([0, 12]) == first
    copy.release()
    source.release()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert source[12] == first[1]
    source.release()


def test_repr_and_locate_say_what_and_where(two_files):
    source = ArrayRecordSource(two_files)
    assert "2 files" in repr(source) and "records=15" in repr(source) and "decode='bytes'" in repr(source)
    assert source.locate(10) == f"record 1 of {two_files[1]}"


def test_readers_of_threads_that_ended_are_closed(two_files):
    source = ArrayRecordSource(two_files)
    source.__getitems__([0, 12])
    fds = len(os.listdir("/proc/self/fd"))  # the main thread's two readers open
    for _ in range(20):
        thread = threading.Thread(target=source.__getitems__, args=([0, 12],))
        thread.start()
        thread.join()
    assert len(os.listdir("/proc/self/fd")) <= fds + 2  # the last thread's two, until the next opens
    source.release()


def test_open_readers_are_bounded_by_max_open_files(two_files):
    source = ArrayRecordSource(two_files, max_open_files=1)
    fds = len(os.listdir("/proc/self/fd"))
    expected = [source[i] for i in range(15)]
    assert source.__getitems__(list(range(15))[::-1]) == expected[::-1]
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    source.release()


def test_running_out_of_descriptors_is_no_corruption(two_files):
    resource = pytest.importorskip("resource")
    source = ArrayRecordSource(two_files)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no descriptor left
    try:
        with pytest.raises(OSError, match="Too many open files"):
            source[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert source[0] == {"bytes": source.__getitems__([0])[0]["bytes"]}
    source.release()
