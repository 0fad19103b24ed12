"""agnostic_prefetch.orbax: the data position saved with the model, one file per process,
restored from every process's file onto any process count."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sources_for_tests import Counting

ocp = pytest.importorskip("orbax.checkpoint")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch.orbax import CheckpointRestore, CheckpointSave, Handler, read_states  # noqa: E402


def loader(**kw):
    size = {} if "global_batch_size" in kw else {"batch_size": 4}
    return ap.Loader(Counting(40), **{**size, "workers": 1, "backend": "thread", "shuffle": True,
                                     "seed": 2, "epochs": 2, **kw})


def save(directory, step, it, model=None):
    with ocp.CheckpointManager(directory) as manager:
        args = {"data": CheckpointSave(it)}
        if model is not None:
            args["model"] = ocp.args.StandardSave(model)
        manager.save(step, args=ocp.args.Composite(**args))
        manager.wait_until_finished()


def restore(directory, step, it, model=None):
    with ocp.CheckpointManager(directory) as manager:
        args = {"data": CheckpointRestore(it)}
        if model is not None:
            args["model"] = ocp.args.StandardRestore(model)
        return manager.restore(step, args=ocp.args.Composite(**args))


@pytest.mark.parametrize("target", ["iterator", "loader", "prefetcher"])
def test_a_position_saved_with_the_model_restores_exactly_into_an_iterator_a_loader_or_a_prefetcher(tmp_path, target):
    with loader() as whole:
        want = [b["i"].tolist() for b in whole]
    with loader() as first:
        stage = ap.prefetch_to_device(first, size=2)
        head = [np.asarray(next(stage)["i"]).tolist() for _ in range(13)]  # into the second epoch
        save(tmp_path, 13, stage, model={"w": np.arange(3.0)})
        stage.close()
    assert json.loads((tmp_path / "13" / "data" / "process_0-of-1.json").read_text())["batch"] == 3
    with loader(workers=2, backend="process") as second:
        it = {"iterator": iter(second), "loader": second,
              "prefetcher": ap.prefetch_to_device(second, size=2)}[target]
        restored = restore(tmp_path, 13, it, model={"w": np.zeros(3)})
        np.testing.assert_array_equal(restored["model"]["w"], np.arange(3.0))
        assert [s["batch"] for s in restored["data"]] == [3]
        tail = [np.asarray(b["i"]).tolist() for b in it]
        if target == "prefetcher":
            it.close()
    assert head + tail == want


def test_the_position_is_the_one_when_the_args_were_built_though_the_stage_keeps_moving(tmp_path):
    with loader() as data:
        stage = ap.prefetch_to_device(data, size=3)
        next(stage)
        args = CheckpointSave(stage)
        for _ in range(4):
            next(stage)
        with ocp.CheckpointManager(tmp_path) as manager:
            manager.save(1, args=ocp.args.Composite(data=args))
            manager.wait_until_finished()
        stage.close()
    assert read_states(tmp_path / "1" / "data")[0]["batch"] == 1


def write_run(directory, states):
    directory.mkdir(parents=True)
    for i, state in enumerate(states):
        (directory / f"process_{i}-of-{len(states)}.json").write_text(json.dumps(state))


def test_restore_reads_every_process_file_of_a_run_saved_on_another_process_count(tmp_path):
    shards = [loader(global_batch_size=12, shard_index=s, shard_count=3, remainder="pad", epochs=1)
              for s in range(3)]
    iterators = [iter(s) for s in shards]
    for _ in range(2):
        for it in iterators:
            next(it)
    write_run(tmp_path / "data", [it.state_dict() for it in iterators])
    for s in shards:
        s.close()
    with loader(global_batch_size=12, shard_index=1, shard_count=2, remainder="pad", epochs=1) as other:
        states = Handler().restore(tmp_path / "data", args=CheckpointRestore(other))
        assert [s["shard_index"] for s in states] == [0, 1, 2]
        rest = [b["i"][b["mask"]].tolist() for b in other]
    with loader(global_batch_size=12, shard_index=1, shard_count=2, remainder="pad", epochs=1) as fresh:
        assert rest == [b["i"][b["mask"]].tolist() for b in fresh][2:]


def test_an_incomplete_or_mixed_checkpoint_is_refused(tmp_path):
    with loader() as data:
        state = data.state_dict()
    write_run(tmp_path / "a", [state, state, state])
    (tmp_path / "a" / "process_1-of-3.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"saved by 3 processes but the files of processes \[1\] are missing"):
        read_states(tmp_path / "a")
    write_run(tmp_path / "b", [state])
    (tmp_path / "b" / "process_0-of-2.json").write_text(json.dumps(state))
    with pytest.raises(FileNotFoundError, match=r"positions of \[1, 2\] process counts"):
        read_states(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="positions of no process counts"):
        read_states(tmp_path / "c")
    write_run(tmp_path / "d", [state, {**state, "batch": 4}])
    with loader() as data, pytest.raises(ValueError, match="process 0 saved batch=0, process 1 batch=4"):
        Handler().restore(tmp_path / "d", args=CheckpointRestore(data))


def test_the_handler_names_the_args_it_needs(tmp_path):
    with pytest.raises(TypeError, match=r"needs CheckpointSave\(iterator\)"):
        Handler().save(tmp_path, args=ocp.args.StandardSave({}))
    with pytest.raises(TypeError, match="has no position to save"):
        CheckpointSave(ap.prefetch_to_device(iter([{"x": np.zeros(2)}])))


def test_packed_batches_resume_through_prefetch_to_device_and_orbax_on_another_shard_count(tmp_path):
    from sequence_sources import Docs

    docs = Docs(np.random.default_rng(11).integers(1, 60, 90))
    options = dict(batching=ap.Pack(length=64, method="best_fit", window=16), shuffle=True, seed=4, epochs=2,
                   remainder="pad")
    with ap.Loader(docs, 4, workers=0, **options) as whole:
        want = [b["tokens"].tolist() for b in whole]
    with ap.Loader(docs, global_batch_size=4, shard_count=2, workers=2, **options) as first:
        stage = ap.prefetch_to_device(first, size=2)
        head = [np.asarray(next(stage)["tokens"]).tolist() for _ in range(len(want) - 5)]  # into epoch 2
        save(tmp_path, 7, stage)
        stage.close()
    saved = json.loads((tmp_path / "7" / "data" / "process_0-of-1.json").read_text())
    assert saved["plan_cursor"] is not None and len(json.dumps(saved)) < 2000
    with ap.Loader(docs, 4, workers=1, **options) as second:
        stage = ap.prefetch_to_device(second, size=2)
        restore(tmp_path, 7, stage)
        tail = [np.asarray(b["tokens"]).tolist() for b in stage]
        stage.close()
    assert [r for b in want[: len(head)] for r in b[:2]] == [r for b in head for r in b]  # shard 0's rows
    assert tail == want[len(head):]
