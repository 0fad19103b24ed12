"""Two JAX processes on loopback: each loads its shard, the device stage assembles global arrays."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("jax")

import agnostic_prefetch as ap  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    import numpy as np
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import agnostic_prefetch as ap
    from agnostic_prefetch.device import prefetch_to_device

    assert jax.process_count() == 2 and len(jax.devices()) == 2
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    source = ap.ArraySource({"x": np.arange(100, dtype=np.float32), "y": np.arange(100) % 7})
    step = jax.jit(lambda b: (jnp.sum(b["x"]), jnp.sum(b["y"]), b["x"].shape[0]))

    def loader(drop_remainder):
        return ap.Loader(source, 8, workers=1, shuffle=True, seed=5,
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         drop_remainder=drop_remainder)

    sums, steps = [0.0, 0], 0
    with loader(True) as shard:
        for batch in prefetch_to_device(shard, 2, sharding=sharding):
            assert batch["x"].sharding == sharding and not batch["x"].is_fully_addressable
            x, y, rows = step(batch)
            assert rows == 16
            sums[0] += float(x); sums[1] += int(y); steps += 1
    print("SUMS", sums[0], sums[1], steps, flush=True)

    # Without drop_remainder the last local batch is short in both processes: the stage
    # must refuse it before any collective could hang.
    with loader(False) as shard:
        try:
            for batch in prefetch_to_device(shard, 2, sharding=sharding):
                step(batch)
        except ValueError as e:
            assert "drop_remainder=True" in str(e) and "['x']" in str(e), e
            print("REFUSED", flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_sums() -> tuple[float, int, int]:
    """What the two shards hold together, read in this process without JAX."""
    source = ap.ArraySource({"x": np.arange(100, dtype=np.float32), "y": np.arange(100) % 7})
    x = y = steps = 0
    for index in range(PROCESSES):
        with ap.Loader(source, 8, workers=0, shuffle=True, seed=5, shard_index=index,
                       shard_count=PROCESSES, drop_remainder=True) as shard:
            for batch in shard:
                x += float(batch["x"].sum())
                y += int(batch["y"].sum())
                steps += 1
    return x, y, steps // PROCESSES


def test_two_processes_assemble_global_batches_and_a_jitted_reduction_sees_both_shards(tmp_path):
    script = tmp_path / "multihost_worker.py"
    script.write_text(SCRIPT)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(PROCESSES)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:  # a hung collective must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, _out, err in outputs:
        assert code == 0, err[-3000:]
    x, y, steps = expected_sums()
    for _, out, _ in outputs:
        lines = out.splitlines()
        sums = next(line for line in lines if line.startswith("SUMS")).split()
        assert float(sums[1]) == x and int(sums[2]) == y and int(sums[3]) == steps
        assert "REFUSED" in lines
