"""Every format source gives the same batches whatever the backend and worker count, and a
state saved with one worker count resumes on another (the order is a function, not a schedule).

The format sources declare ``thread_safe = True``: several worker threads then read through
one source object at once, which these runs exercise.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import agnostic_prefetch as ap

N = 60


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _parquet(tmp):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for f in range(2):
        rows = range(f * N // 2, (f + 1) * N // 2)
        pq.write_table(pa.table({"i": pa.array(list(rows), pa.int64()),
                                 "v": pa.array([[r, r + 1, r + 2] for r in rows], pa.list_(pa.int32(), 3))}),
                       tmp / f"part-{f}.parquet", row_group_size=7)
    return ap.ParquetSource(str(tmp / "part-*.parquet")), lambda item, rng: {"i": item["i"]}


def _huggingface(tmp):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"i": list(range(N)), "v": [[r] * 3 for r in range(N)]})
    data.save_to_disk(str(tmp / "hf"))
    return datasets.load_from_disk(str(tmp / "hf")).shuffle(seed=1), lambda item, rng: {"i": item["i"]}


def _arrayrecord(tmp):
    module = pytest.importorskip("array_record.python.array_record_module")
    for f in range(2):
        writer = module.ArrayRecordWriter(str(tmp / f"r-{f}.array_record"), "group_size:1")
        for r in range(f * N // 2, (f + 1) * N // 2):
            writer.write(np.int64(r).tobytes())
        writer.close()
    return (ap.ArrayRecordSource(str(tmp / "r-*.array_record")),
            lambda item, rng: {"i": np.frombuffer(item["bytes"], np.int64)[0]})


def _tfrecord(tmp):
    tfrecord = pytest.importorskip("tfrecord")
    writer = tfrecord.TFRecordWriter(str(tmp / "d.tfrecord"))
    for r in range(N):
        writer.write({"i": (r, "int")})
    writer.close()
    return ap.TFRecordSource(str(tmp / "d.tfrecord")), lambda item, rng: {"i": item["i"][0]}


def _webdataset(tmp):
    wds = pytest.importorskip("webdataset")
    for s in range(2):
        with wds.TarWriter(str(tmp / f"shard-{s}.tar")) as writer:
            for r in range(s * N // 2, (s + 1) * N // 2):
                writer.write({"__key__": f"k{r:04d}", "png": _png(r), "cls": r})
    return (ap.WebDatasetSource(str(tmp / "shard-{0..1}.tar")),
            lambda item, rng: {"i": np.int64(item["cls"]), "px": item["png"][0, 0, 0]})


def _imagefolder(tmp):
    for c in ("a", "b"):
        (tmp / "folder" / c).mkdir(parents=True)
        for r in range(N // 2):
            (tmp / "folder" / c / f"{r:03d}.png").write_bytes(_png(r))
    return ap.ImageFolderSource(str(tmp / "folder")), lambda item, rng: {"label": item["label"],
                                                                        "px": item["image"][0, 0, 0]}


FORMATS = {"parquet": _parquet, "huggingface": _huggingface, "arrayrecord": _arrayrecord, "tfrecord": _tfrecord,
           "webdataset": _webdataset, "imagefolder": _imagefolder}


def _batches(source, transform, **kwargs):
    with ap.Loader(source, 8, shuffle=True, seed=4, epochs=2, transform=transform, **kwargs) as loader:
        return [{k: v.tolist() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_format_gives_the_same_batches_on_every_backend_and_resumes_on_another_worker_count(name, tmp_path):
    source, transform = FORMATS[name](tmp_path)
    reference = _batches(source, transform, workers=0)
    assert len(reference) == 2 * -(-N // 8)
    assert _batches(source, transform, workers=2, backend="thread") == reference
    assert _batches(source, transform, workers=2) == reference
    with ap.Loader(source, 8, shuffle=True, seed=4, epochs=2, transform=transform, workers=2,
                   backend="thread") as loader:
        it = iter(loader)
        head = [{k: v.tolist() for k, v in next(it).items()} for _ in range(5)]
        state = json.loads(json.dumps(loader.state_dict()))
    with ap.Loader(source, 8, shuffle=True, seed=4, epochs=2, transform=transform, workers=1) as loader:
        loader.load_state_dict(state)
        rest = [{k: v.tolist() for k, v in b.items()} for b in loader]
    assert head + rest == reference
