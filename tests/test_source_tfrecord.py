"""TFRecordSource: files written by the ``tfrecord`` package read back as protobuf reads them,
locally and through a local S3 server; the index; the loader; every bad-data case."""

from __future__ import annotations

import gzip
import logging
import os
import zlib

import cloudpickle
import numpy as np
import pytest
from tf_example_messages import assert_items_equal, reference_items

import agnostic_prefetch as ap
from agnostic_prefetch.sources.tfrecord import TFRecordError, TFRecordSource

tfrecord_writer = pytest.importorskip("tfrecord.writer", reason="the TFRecord tests need the tfrecord package (the test extra)")
tfrecord_reader = pytest.importorskip("tfrecord.reader")


def write(path, count: int, *, start: int = 0, payload: int = 50) -> str:
    """``count`` Examples written by the tfrecord package's writer (its own framing and CRCs)."""
    rng = np.random.default_rng(start)
    writer = tfrecord_writer.TFRecordWriter(str(path))
    for i in range(start, start + count):
        writer.write({"i": ([i, -i], "int"), "f": (rng.random(3).astype(np.float32), "float"),
                      "blob": ([rng.bytes(payload + i % 7), b"k%d" % i], "byte")})
    writer.close()
    return str(path)


def reference(path: str) -> list[dict]:
    """The records as the tfrecord package frames them and the protobuf runtime parses them."""
    return [reference_items(bytes(r)) for r in tfrecord_reader.tfrecord_iterator(path)]


def frame_offsets(path: str) -> list[int]:
    data, offsets, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + int.from_bytes(data[pos:pos + 8], "little")
    return offsets


@pytest.fixture
def two_files(tmp_path):
    return [write(tmp_path / "a.tfrecord", 7), write(tmp_path / "b.tfrecord", 5, start=7)]


def test_records_equal_the_tfrecord_packages_through_protobuf(two_files):
    source = TFRecordSource(two_files)
    want = reference(two_files[0]) + reference(two_files[1])
    assert len(source) == 12
    for i, item in enumerate(want):
        assert_items_equal(source[i], item)
    order = [11, 0, 3, 3, 8, 7, 1]
    for got, i in zip(source.__getitems__(order), order, strict=True):
        assert_items_equal(got, want[i])


def test_records_read_through_the_s3_server_equal_local(s3, tmp_path, two_files, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    urls = [s3.upload(p, f"tf/{os.path.basename(p)}") for p in two_files]
    local = TFRecordSource(two_files)
    remote = TFRecordSource(s3.url("tf/*.tfrecord"))
    assert remote.paths == urls
    assert all(loc.startswith(str(tmp_path / "cache" / "agnostic_prefetch" / "tfrecord-index"))
               for loc in remote.index_locations)
    order = list(range(12))[::-1]
    for a, b in zip(local.__getitems__(order), remote.__getitems__(order), strict=True):
        assert_items_equal(b, a)
    assert_items_equal(remote[4], local[4])
    named = TFRecordSource(urls, index_dir=tmp_path / "idx")
    assert all(loc.startswith(str(tmp_path / "idx")) for loc in named.index_locations)


def test_index_is_saved_next_to_the_file_and_reused_while_it_is_unchanged(tmp_path, caplog):
    path = write(tmp_path / "a.tfrecord", 6)
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        TFRecordSource(path)
        assert os.path.exists(path + ".apidx") and "indexed 6 records" in caplog.text
        caplog.clear()
        TFRecordSource(path)
    assert "indexed" not in caplog.text


def test_a_changed_file_gets_its_index_rebuilt_and_an_old_source_refuses_it(tmp_path, caplog):
    path = write(tmp_path / "a.tfrecord", 6)
    old = TFRecordSource(path)
    write(tmp_path / "a.tfrecord", 9, start=100)
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        new = TFRecordSource(path)
    assert "changed since its index" in caplog.text and len(new) == 9
    assert_items_equal(new[8], reference(path)[8])
    with pytest.raises(TFRecordError, match=r"changed after its index was built.*create the TFRecordSource again"):
        old[0]


def test_index_goes_under_index_dir_when_given(tmp_path):
    path = write(tmp_path / "a.tfrecord", 3)
    source = TFRecordSource(path, index_dir=tmp_path / "idx")
    assert source.index_locations[0].startswith(str(tmp_path / "idx")) and not os.path.exists(path + ".apidx")


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_equal_for_any_worker_count_and_resume_exactly(tmp_path, workers):
    paths = [write(tmp_path / "a.tfrecord", 13), write(tmp_path / "b.tfrecord", 10, start=13)]
    source = TFRecordSource(paths)

    def numeric(item, rng):
        return {"i": item["i"], "f": item["f"], "n": np.int64(len(item["blob"][0]))}

    def run(loader_workers, state=None, take=None):
        with ap.Loader(source, 4, workers=loader_workers, shuffle=True, seed=5, transform=numeric) as loader:
            if state is not None:
                loader.load_state_dict(state)
            it, out = iter(loader), []
            for batch in it:
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
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(full, head + rest, strict=True):
        np.testing.assert_array_equal(a["i"], b["i"])


@pytest.mark.parametrize("kind", ["gzip", "zlib"])
def test_a_compressed_file_is_refused_with_the_remedy(tmp_path, kind):
    raw = open(write(tmp_path / "a.tfrecord", 4), "rb").read()
    path = tmp_path / "c.tfrecord"
    path.write_bytes(gzip.compress(raw) if kind == "gzip" else zlib.compress(raw))
    with pytest.raises(TFRecordError, match=rf"{kind.upper()}-compressed.*decompress it once"):
        TFRecordSource(str(path))


def test_a_truncated_file_names_the_record_and_offset(tmp_path):
    path = write(tmp_path / "a.tfrecord", 10)
    offsets = frame_offsets(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-9])
    with pytest.raises(TFRecordError, match=rf"truncated: record 9 at byte offset {offsets[9]} .*cut it at byte {offsets[9]} to keep the 9 records"):
        TFRecordSource(path)


def test_a_corrupt_length_stops_the_index_naming_record_and_offset(tmp_path):
    path = write(tmp_path / "a.tfrecord", 10)
    at = frame_offsets(path)[5]
    data = bytearray(open(path, "rb").read())
    data[at + 1] ^= 0x40
    open(path, "wb").write(bytes(data))
    with pytest.raises(TFRecordError, match=rf"record 5 at byte offset {at} has a corrupt length"):
        TFRecordSource(path)


def test_a_data_crc_mismatch_raises_on_read_and_the_loader_can_skip_it(tmp_path, caplog):
    path = write(tmp_path / "a.tfrecord", 10)
    at = frame_offsets(path)[3]
    data = bytearray(open(path, "rb").read())
    data[at + 12 + 4] ^= 0x01  # a byte of record 3's message
    open(path, "wb").write(bytes(data))
    source = TFRecordSource(path)
    assert len(source) == 10
    with pytest.raises(TFRecordError, match=rf"record 3 of .*a.tfrecord \(byte offset {at}\): the data CRC does not match.*on_error='skip'"):
        source[3]
    with pytest.raises(TFRecordError, match="record 3 of"):
        source.__getitems__([0, 3, 5])
    with ap.Loader(source, 3, workers=2, on_error="skip", transform=lambda item, rng: {"i": item["i"]}) as loader:
        ids = [int(i) for b in loader for i in np.array(b["i"])[:, 0]]
        assert loader.stats()["skipped"] == 1
    assert ids == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_a_record_over_max_record_bytes_is_refused_before_reading(tmp_path):
    path = write(tmp_path / "a.tfrecord", 3, payload=5000)
    source = TFRecordSource(path, max_record_bytes=1000)
    with pytest.raises(TFRecordError, match=r"record 1 of .* holds 50\d\d bytes, more than max_record_bytes=1000"):
        source[1]
    with pytest.raises(TFRecordError, match="max_record_bytes=1000"):
        source.__getitems__([0])


def test_a_record_that_is_no_example_names_the_record(tmp_path):
    masked_crc = tfrecord_writer.TFRecordWriter.masked_crc  # the package's own framing CRC
    record = b"\x0a\x05\x0a\x03\x0a\x01"  # features -> entry -> a key running past its message
    length = len(record).to_bytes(8, "little")
    (tmp_path / "x.tfrecord").write_bytes(length + masked_crc(length) + record + masked_crc(record))
    source = TFRecordSource(str(tmp_path / "x.tfrecord"))
    with pytest.raises(TFRecordError, match=r"record 0 of .*not a valid tf.train.Example at byte \d+"):
        source[0]


def test_it_pickles_after_a_read_and_holds_no_file_open(tmp_path):
    source = TFRecordSource(write(tmp_path / "a.tfrecord", 4))
    fds = len(os.listdir("/proc/self/fd"))
    first = source[2]
    assert len(os.listdir("/proc/self/fd")) == fds
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    assert_items_equal(copy[2], first)
    source.release()
    assert_items_equal(source[2], first)


def test_repr_and_locate_say_what_and_where(two_files):
    source = TFRecordSource(two_files)
    assert "2 files" in repr(source) and "records=12" in repr(source) and "tf.train.Example" in repr(source)
    at = frame_offsets(two_files[1])[2]
    assert source.locate(9) == f"record 2 of {two_files[1]} (byte offset {at})"


def test_a_glob_leaves_out_the_indexes_saved_beside_the_files(tmp_path):
    for k in range(2):  # TFDS's names: the glob "...tfrecord-*" matches "...-00002.apidx" too
        write(tmp_path / f"mnist-train.tfrecord-0000{k}-of-00002", 3, start=3 * k)
    pattern = str(tmp_path / "mnist-train.tfrecord-*")
    first = TFRecordSource(pattern)
    assert all(os.path.exists(p) for p in first.index_locations)
    again = TFRecordSource(pattern)
    assert again.paths == first.paths and len(again) == 6


def test_a_glob_matching_only_indexes_names_them(tmp_path):
    write(tmp_path / "a.tfrecord", 2)
    TFRecordSource(str(tmp_path / "a.tfrecord"))
    with pytest.raises(FileNotFoundError, match=r"matches only the 1 index file\(s\) \(\*\.apidx\)"):
        TFRecordSource(str(tmp_path / "*.apidx"))
