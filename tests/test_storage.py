import pytest

from agnostic_prefetch.sources import _storage


def test_storage_reads_local_and_s3_alike(s3, tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"0123456789")
    url = s3.upload(str(p), "dir/a.bin")
    for path in (str(p), url):
        assert _storage.read_range(path, 3, 4) == b"3456"
        assert _storage.file_size(path) == 10
        with _storage.open_binary(path) as f:
            assert f.read() == b"0123456789"
        assert _storage.file_signature(path)["size"] == 10
    assert _storage.expand_paths(s3.url("dir/*.bin")) == [url]
    assert _storage.expand_paths(str(tmp_path / "*.bin")) == [str(p)]


def test_a_directory_gives_its_data_files_sorted_without_hidden_files_or_indexes(s3, tmp_path):
    names = ["b/part-1.parquet", "part-0.parquet", "part-0.parquet.apidx", "shard.tar.index.json", "_SUCCESS",
             ".hidden", "_tmp/part-9.parquet", "c/part-2.parquet"]
    for name in names:
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"x")
    kept = ["b/part-1.parquet", "c/part-2.parquet", "part-0.parquet"]
    assert _storage.expand_paths(str(tmp_path / "d")) == [str(tmp_path / "d" / k) for k in kept]
    urls = {name: s3.upload(str(tmp_path / "d" / name), f"d/{name}") for name in names}
    assert _storage.expand_paths(s3.url("d")) == [urls[k] for k in kept]


def test_a_directory_without_data_files_names_itself(tmp_path):
    (tmp_path / "_SUCCESS").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"no Parquet files at {tmp_path}"):
        _storage.expand_paths(str(tmp_path), what="Parquet files")
