"""Several JAX processes on loopback (gloo): global arrays assembled from each process's slice,
an Orbax checkpoint taken on 2 processes resumed on 3 and then on 1, every step's global
arrays equal to an uninterrupted single-process run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("orbax.checkpoint")

import agnostic_prefetch as ap  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 12  # a multiple of 6: it splits over 1, 2 and 3 processes
RECORDS, EPOCHS = 50, 2  # 5 global batches an epoch, the last one of 2 items (padded)


def draws(example, rng):
    """A per-item random draw, so the test sees that draws follow the item, not the shard."""
    return {**example, "r": np.float32(rng.random())}


def source():
    return ap.ArraySource({"i": np.arange(RECORDS), "x": np.arange(RECORDS, dtype=np.float32) * 0.5})


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    process_id, count, port, directory, first, last = sys.argv[1:7]
    process_id, count, first, last = int(process_id), int(count), int(first), int(last)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                               process_id=process_id, initialization_timeout=60)
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import agnostic_prefetch as ap
    from agnostic_prefetch.orbax import CheckpointRestore, CheckpointSave
    from test_multihost import GLOBAL_BATCH, EPOCHS, draws, source

    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    shard = ap.shard_for(sharding, GLOBAL_BATCH)
    assert shard == {"shard_index": process_id, "shard_count": count}, shard

    def loader(**where):
        return ap.Loader(source(), global_batch_size=GLOBAL_BATCH, workers=1, backend="thread",
                         shuffle=True, seed=5, epochs=EPOCHS, remainder="pad", transform=draws,
                         **where)

    if count > 1 and first == 0:  # the slice must be the rows this process's devices hold
        with loader(shard_index=(process_id + 1) % count, shard_count=count) as wrong:
            try:
                ap.prefetch_to_device(wrong, 2, sharding=sharding)
            except ValueError as e:
                assert "ap.shard_for(sharding, 12)" in str(e), e
                print("REFUSED", flush=True)

    manager = ocp.CheckpointManager(directory)
    with loader(**shard) as data:
        it = ap.prefetch_to_device(data, 2, sharding=sharding)
        model = {"step": np.array(first)}
        if first:
            restored = manager.restore(first, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(model), data=CheckpointRestore(it)))
            assert int(restored["model"]["step"]) == first
            assert len(restored["data"]) == int(sys.argv[7])  # every file of the saved run
        for step in range(first, last):
            batch = next(it)
            assert batch["i"].shape == (GLOBAL_BATCH,) and batch["i"].sharding == sharding
            full = {k: multihost_utils.process_allgather(batch[k], tiled=True).tolist()
                    for k in ("i", "x", "r", "mask")}
            if process_id == 0:
                print("STEP", step, json.dumps(full), flush=True)
        manager.save(last, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"step": np.array(last)}), data=CheckpointSave(it)))
        manager.wait_until_finished()
        it.close()
    manager.close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(tmp_path, count, first, last, saved_by):
    script = tmp_path / "multihost_worker.py"
    script.write_text(SCRIPT)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    directory = tmp_path / "checkpoints"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), str(count), str(port), str(directory),
                          str(first), str(last), str(saved_by)],
                         env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(count)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:  # a hung collective must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, _out, err in outputs:
        assert code == 0, err[-3000:]
    lines = outputs[0][1].splitlines()
    steps = {int(line.split()[1]): json.loads(line.split(maxsplit=2)[2]) for line in lines if line.startswith("STEP")}
    assert sorted(steps) == list(range(first, last))
    if count > 1 and first == 0:
        assert all("REFUSED" in out.splitlines() for _, out, _ in outputs)
    return steps


def uninterrupted():
    """Every step's global batch from one loader in this process, without JAX."""
    with ap.Loader(source(), global_batch_size=GLOBAL_BATCH, workers=0, shuffle=True, seed=5,
                   epochs=EPOCHS, remainder="pad", transform=draws) as loader:
        return [{k: np.asarray(b[k]).tolist() for k in ("i", "x", "r", "mask")} for b in loader]


def test_a_run_checkpointed_on_two_processes_resumes_on_three_and_then_on_one(tmp_path):
    want = uninterrupted()
    assert len(want) == 10 and sum(want[4]["mask"]) == 2  # padding in the last batch of each epoch
    got = run_processes(tmp_path, 2, 0, 3, 0)
    got |= run_processes(tmp_path, 3, 3, 7, 2)  # crosses the epoch boundary
    got |= run_processes(tmp_path, 1, 7, 10, 3)
    for step, batch in enumerate(want):
        assert got[step]["i"] == batch["i"] and got[step]["mask"] == batch["mask"], step
        np.testing.assert_array_equal(got[step]["x"], np.float32(batch["x"]))
        np.testing.assert_array_equal(got[step]["r"], np.float32(batch["r"]))
