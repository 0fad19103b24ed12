"""WebDatasetSource: tar shards written by webdataset's TarWriter read back as webdataset's own pipeline gives them."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tracemalloc
import zipfile

import cloudpickle
import numpy as np
import pytest
from PIL import Image

wds = pytest.importorskip("webdataset")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch.sources import _tar_index  # noqa: E402
from agnostic_prefetch.sources._tar_index import TarFormatError, scan_tar  # noqa: E402
from agnostic_prefetch.sources._wds_decode import decode_member, expand_braces  # noqa: E402
from agnostic_prefetch.sources.webdataset import WebDatasetSource  # noqa: E402


def encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def write_shards(folder, shards: int = 3, per_shard: int = 6, *, fixed: bool = False) -> str:
    """Shards by webdataset's TarWriter; returns their brace pattern. ``fixed``: every field one shape."""
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as writer:
            for i in range(per_shard):
                image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                sample = {"__key__": f"s{s}/{i:04d}", "jpg": encoded(image, "JPEG"), "cls": s * per_shard + i,
                          "json": {"shard": s, "i": i}}
                if not fixed:
                    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
                    sample.update({"png": encoded(gray, "PNG"), "txt": f"caption {s} {i}",
                                   "npy": np.arange(i + 1, dtype=np.float32), "seg.png": encoded(image, "PNG"),
                                   "bin": bytes([s, i]) * 3})
                writer.write(sample)
    return str(folder / f"shard-{{000000..{shards - 1:06d}}}.tar")


def assert_same_sample(ours: dict, theirs: dict) -> None:
    theirs = {k: v for k, v in theirs.items() if k != "__local_path__"}  # = __url__ for a local shard
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if isinstance(value, np.ndarray):
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
        else:
            assert type(ours[key]) is type(value) and ours[key] == value, key


@pytest.mark.parametrize("pattern", [
    "a-{000000..000012}.tar", "x{a,b{1..3},}y", "{9..11}", "{-2..2}", "{05..1..2}", "{a..e..2}", "{X..c}",
    "{a}", "{}", "p{x,{1,2}}-{0..1}", "no braces"])
def test_brace_patterns_expand_as_braceexpand_does(pattern):
    import braceexpand

    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern, escape=False))


def test_unbalanced_braces_are_refused():
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_braces("shard-{000..009.tar")


def test_items_equal_webdatasets_own_decoded_samples(tmp_path):
    pattern = write_shards(tmp_path)
    theirs = list(wds.WebDataset(pattern, shardshuffle=False).decode("rgb8"))
    source = WebDatasetSource(pattern)
    assert len(source) == len(theirs) == 18
    for i, sample in enumerate(theirs):
        assert_same_sample(source[i], sample)
    item = source[0]
    assert item["jpg"].shape == (12, 16, 3) and item["png"].shape == (5, 7, 3) and item["seg.png"].dtype == np.uint8
    assert isinstance(item["cls"], int) and item["json"] == {"shard": 0, "i": 0} and item["bin"] == b"\0\0" * 3


def test_decode_false_gives_the_bytes_webdataset_reads(tmp_path):
    pattern = write_shards(tmp_path, shards=2)
    theirs = list(wds.WebDataset(pattern, shardshuffle=False))
    source = WebDatasetSource(pattern, decode=False)
    for i, sample in enumerate(theirs):
        assert_same_sample(source[i], sample)


def test_getitems_gives_the_asked_order_with_one_read_per_run_of_a_shard(tmp_path, monkeypatch):
    source = WebDatasetSource(write_shards(tmp_path))
    indices = [13, 2, 3, 2, 17, 0, 12]
    expected = [source[i] for i in indices]
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append((fd, n, at)) or real(fd, n, at))
    got = source.__getitems__(indices)
    assert [g["__key__"] for g in got] == [e["__key__"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert_same_sample(g, e)
    assert len(reads) == 2  # shard 0 (samples 0, 2, 3) and shard 2 (12, 13, 17): one read each


def test_shards_through_s3_read_as_the_local_ones(tmp_path, s3, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    write_shards(local)
    for s in range(3):
        s3.upload(str(local / f"shard-{s:06d}.tar"), f"wds/shard-{s:06d}.tar")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    theirs = list(wds.WebDataset(str(local / "shard-{000000..000002}.tar"), shardshuffle=False).decode("rgb8"))
    source = WebDatasetSource(s3.url("wds/shard-{000000..000002}.tar"))
    assert source.shards == [s3.url(f"wds/shard-{s:06d}.tar") for s in range(3)]
    assert all(p.startswith(str(tmp_path / "cache" / "agnostic_prefetch" / "tar_index")) for p in source.index_paths)
    assert all(os.path.exists(p) for p in source.index_paths)
    got = source.__getitems__(list(range(len(source))))
    for i, sample in enumerate(theirs):
        sample["__url__"] = source.shards[i // 6]
        assert_same_sample(source[i], sample)
        assert_same_sample(got[i], sample)
    explicit = WebDatasetSource(s3.url("wds/*.tar"), index_dir=tmp_path / "idx")
    assert len(explicit) == 18 and all(p.startswith(str(tmp_path / "idx")) for p in explicit.index_paths)
    with ap.Loader(explicit, 4, workers=2, transform=_keep_fixed) as loader:
        labels = [int(c) for b in loader for c in b["cls"]]
    assert labels == list(range(18))


def _keep_fixed(item, rng):
    return {"jpg": item["jpg"], "cls": item["cls"], "key": item["__key__"]}


def test_index_is_saved_beside_the_shard_reused_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path, shards=2)
    first = WebDatasetSource(pattern)
    assert first.index_paths == [str(tmp_path / f"shard-{s:06d}.tar.index.json") for s in range(2)]
    assert all(os.path.exists(p) for p in first.index_paths)

    def no_scan(*args, **kwargs):
        raise AssertionError("the saved index should have been reused")

    monkeypatch.setattr(_tar_index, "scan_tar", no_scan)
    assert WebDatasetSource(pattern)[7]["__key__"] == first[7]["__key__"]
    assert WebDatasetSource(str(tmp_path / "*")).shards == first.shards  # the saved indices are not shards
    monkeypatch.undo()
    with wds.TarWriter(str(tmp_path / "shard-000001.tar")) as writer:  # the shard changes
        writer.write({"__key__": "new", "cls": 99})
    again = WebDatasetSource(pattern)
    assert len(again) == 7 and again[6] == {"__key__": "new", "__url__": again.shards[1], "cls": 99}


def test_a_glob_leaves_out_the_indices_saved_beside_shards_of_any_name(tmp_path):
    for k in range(2):  # shards without ".tar": "shard-*" matches "shard-0000.index.json" too
        with tarfile.open(tmp_path / f"shard-{k:04d}", "w") as tar:
            info = tarfile.TarInfo(f"s{k}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    first = WebDatasetSource(str(tmp_path / "shard-*"))
    assert all(os.path.exists(p) for p in first.index_paths)
    again = WebDatasetSource(str(tmp_path / "shard-*"))
    assert again.shards == first.shards and len(again) == 2


def test_a_shard_changed_after_indexing_is_refused_when_read(tmp_path):
    source = WebDatasetSource(write_shards(tmp_path, shards=1))
    with open(source.shards[0], "ab") as f:
        f.write(bytes(1024))
    with pytest.raises(ValueError, match="changed after it was indexed.*construct the source again"):
        source[0]


def test_tar_headers_are_read_as_tarfile_reads_them(tmp_path):
    """GNU long names, pax paths (long and non-ASCII), ustar prefixes, directories, links."""
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            names = ["d/" + "x" * 90 + "/sample.jpg", "é/ü.txt", "plain.cls", "d2/"]
            if fmt != tarfile.USTAR_FORMAT:
                names.append("long/" + "y" * 150 + ".txt")
            for k, name in enumerate(names):
                info = tarfile.TarInfo(name.rstrip("/"))
                if name.endswith("/"):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = 700 * k + 1
                    tar.addfile(info, io.BytesIO(bytes(info.size)))
            link = tarfile.TarInfo("link.txt")
            link.type, link.linkname = tarfile.SYMTYPE, "plain.cls"
            tar.addfile(link)
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
        assert scan_tar(str(path)) == expected


def test_members_are_grouped_and_skipped_as_webdataset_does(tmp_path):
    path = tmp_path / "g.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["__meta__", "a.CLS", "a.Json", "README", "b.x.cls", "__x__/c.cls", "d/.hidden.cls", "a.txt"]:
            data = b"1" if name.lower().endswith("cls") else b'"t"'
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    theirs = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    ours = WebDatasetSource(str(path))
    # a; b (key up to the first dot); "d/" (the key regex lets a dot-file's folder be the key,
    # extension "hidden.cls"); a again, since only consecutive members share a sample
    assert [ours.key(i) for i in range(len(ours))] == [t["__key__"] for t in theirs] == ["a", "b", "d/", "a"]
    for i, sample in enumerate(theirs):
        assert_same_sample(ours[i], sample)


def test_a_repeated_extension_in_one_sample_is_refused_naming_it(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("k.cls", "k.CLS"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ValueError, match="'k.CLS'.*repeats extension 'cls' in sample 'k'"):
        WebDatasetSource(str(path))


def _corrupt(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_truncated_shard_names_the_member_offset_and_remedy(tmp_path):
    source = WebDatasetSource(write_shards(tmp_path, shards=1), index_dir=tmp_path / "idx")
    path = source.shards[0]
    cut = next(offset for name, offset, _ in scan_tar(path) if name.startswith("s0/0003.")) + 5
    os.truncate(path, cut)
    with pytest.raises(TarFormatError) as info:
        WebDatasetSource(path, index_dir=tmp_path / "idx")
    message = str(info.value)
    assert path in message and "s0/0003" in message and f"the file ends at byte {cut}" in message
    assert "truncated" in message and "Remedy" in message
    os.truncate(path, cut - 5 - 200)  # inside the member's header
    with pytest.raises(TarFormatError, match=r"truncated: the tar header at byte \d+ .* has 312 of 512 bytes"):
        WebDatasetSource(path, index_dir=tmp_path / "idx")


def test_a_corrupt_header_checksum_is_an_error_where_tarfile_would_stop_quietly(tmp_path):
    path = tmp_path / "c.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.cls", "b.cls", "c.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    _corrupt(path, 1024, b"z")  # the second header's name
    with tarfile.open(path) as tar:
        assert [m.name for m in tar] == ["a.cls"]  # tarfile ends the archive there
    with pytest.raises(TarFormatError, match=r"c.tar: the tar header at byte 1024 \(after a.cls\) has a bad checksum"):
        WebDatasetSource(str(path))


def test_a_member_size_past_the_end_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with open(path, "rb") as f:
        header = bytearray(f.read(512))
    header[124:136] = b"77777777777\0"  # 8 GiB
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    _corrupt(path, 0, bytes(header))
    with pytest.raises(TarFormatError, match=r"member 'a.bin' \(header at byte 0\) says 8589934591 bytes"):
        WebDatasetSource(str(path))


def npy_header(shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return out.getvalue()


def test_npy_npz_and_gz_members_decode_as_numpy_and_gzip_do():
    arrays = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.array(["x", "yz"])}
    npz = io.BytesIO()
    np.savez_compressed(npz, **arrays)
    got = decode_member("npz", npz.getvalue(), name="k.npz")
    assert list(got) == ["a", "b"] and all(np.array_equal(got[k], v) for k, v in arrays.items())
    npy = io.BytesIO()
    np.save(npy, arrays["a"].T)
    two_members = gzip.compress(npy.getvalue()[:40]) + bytes(3) + gzip.compress(npy.getvalue()[40:])
    np.testing.assert_array_equal(decode_member("npy.gz", two_members, name="k.npy.gz"), arrays["a"].T)


@pytest.mark.parametrize("wrap", ["npy", "npz"])
def test_an_array_header_asking_more_than_its_bytes_is_refused_without_allocating_it(wrap):
    data = npy_header((1 << 28,)) + bytes(32)  # says 2 GiB of float64, holds 32 bytes
    if wrap == "npz":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("x.npy", data)
        data = out.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"k\.{wrap}.*shape \(268435456,\) of float64 \(2147483648 bytes\) "
                                             r"but 32 bytes follow the header.*np\.save"):
            decode_member(wrap, data, name=f"k.{wrap}")
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("ext", ["txt.gz", "npz"])
def test_a_member_decompressing_past_the_bound_is_refused(ext):
    if ext == "npz":
        out = io.BytesIO()
        np.savez_compressed(out, a=np.zeros(5000, np.uint8))
        data = out.getvalue()
    else:
        data = gzip.compress(bytes(5000))
    assert len(data) < 1000
    with pytest.raises(ValueError, match=rf"k\.{ext}.*decompresses to more than 1000 bytes.*max_sample_bytes"):
        decode_member(ext, data, name=f"k.{ext}", limit=1000)


def test_a_sample_over_max_sample_bytes_is_refused_before_it_is_read(tmp_path, monkeypatch):
    source = WebDatasetSource(write_shards(tmp_path, shards=1), max_sample_bytes=600)

    def no_read(*args, **kwargs):
        raise AssertionError("nothing should be read")

    monkeypatch.setattr(os, "pread", no_read)
    for index, read in ((1, lambda: source[1]), (0, lambda: source.__getitems__([0, 1]))):
        with pytest.raises(ValueError, match=rf"sample {index} \(key 's0/000{index}'.* of .*shard-000000\.tar: \d+ "
                                             r"bytes as the shard's index says, more than max_sample_bytes=600"
                                             r".*Remedy: pass a larger max_sample_bytes"):
            read()


def test_a_compressed_shard_is_refused_with_the_remedy(tmp_path):
    path = tmp_path / "shard.tar.gz"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "a", "cls": 1})
    with pytest.raises(TarFormatError, match="gzip-compressed.*Remedy: decompress the shards"):
        WebDatasetSource(str(path))


def test_a_corrupt_image_names_its_member_and_is_skipped_with_on_error_skip(tmp_path):
    pattern = write_shards(tmp_path, shards=1, fixed=True)
    source = WebDatasetSource(pattern)
    offset = next(offset for name, offset, _ in scan_tar(source.shards[0]) if name == "s0/0002.jpg")
    _corrupt(source.shards[0], offset, b"\0" * 64)
    source = WebDatasetSource(pattern)  # the shard changed: its index is rebuilt
    with pytest.raises(ValueError, match=r"member s0/0002.jpg \(bytes \d+\.\.\d+\) of .*shard-000000.tar"):
        source[2]
    with ap.Loader(source, 2, workers=2, on_error="skip", transform=_keep_fixed) as loader:
        labels = [int(c) for b in loader for c in b["cls"]]
    assert labels == [0, 1, 3, 4, 5]


def test_loader_batches_equal_for_any_worker_count_and_resume_exactly(tmp_path):
    source = WebDatasetSource(write_shards(tmp_path, fixed=True))
    runs = []
    for workers in (0, 2):
        with ap.Loader(source, 4, workers=workers, shuffle=True, seed=5, epochs=2) as loader:
            runs.append([(list(b["__key__"]), np.array(b["jpg"]), np.array(b["cls"])) for b in loader])
    for a, b in zip(*runs, strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=5, epochs=2) as loader:
        it = iter(loader)
        head = [list(next(it)["__key__"]) for _ in range(3)]
        state = loader.state_dict()
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=5, epochs=2) as loader:
        loader.load_state_dict(state)
        rest = [list(b["__key__"]) for b in loader]
    assert head + rest == [r[0] for r in runs[0]]


def test_open_shards_are_bounded_so_more_shards_than_descriptors_read(tmp_path):
    resource = pytest.importorskip("resource")
    for i in range(300):
        with tarfile.open(tmp_path / f"s{i:04d}.tar", "w") as tar:
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    source = WebDatasetSource(str(tmp_path / "s*.tar"), max_open_files=16)
    fds = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, fds + 100), hard))  # fewer than the shards
    try:
        keys = [item["__key__"] for start in range(0, 300, 64)
                for item in source.__getitems__(list(range(start, min(300, start + 64))))]
        assert len(os.listdir("/proc/self/fd")) <= fds + 16
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        source.release()
    assert keys == [f"k{i}" for i in range(300)]
    assert len(os.listdir("/proc/self/fd")) == fds


def test_pickles_after_a_read_and_release_closes_the_shards(tmp_path):
    source = WebDatasetSource(write_shards(tmp_path, shards=2))
    first = source[7]

    def open_shards():
        fds = os.listdir("/proc/self/fd")
        return [p for p in (os.path.realpath(f"/proc/self/fd/{fd}") for fd in fds) if p.endswith(".tar")]

    assert len(open_shards()) == 1
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    assert_same_sample(copy[7], first)
    copy.release()
    source.release()
    assert open_shards() == []
    assert "2 tar shard(s)" in repr(source) and "samples=12" in repr(source) and "'jpg'" in repr(source)
    assert source.locate(7).startswith("sample 7 (key 's1/0001': .bin .cls .jpg .json .npy .png .seg.png .txt) at bytes ") and "shard-000001.tar" in source.locate(7)
