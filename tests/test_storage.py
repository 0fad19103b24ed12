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
