"""prefetch_to_device, the JAX placement: devices, flax's device axis, shardings, resume, held arrays."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch.device import prefetch_to_device  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(n: int, rows: int = 4):
    for i in range(n):
        yield {"x": np.full((rows, 3), i, np.float32), "y": np.arange(rows, dtype=np.int32) + i}


def feeder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "agnostic_prefetch-device"]


@pytest.mark.parametrize("thread", [False, True])
def test_yields_jax_arrays_with_the_same_values_on_the_first_local_device(thread):
    out = list(prefetch_to_device(batches(5), size=2, thread=thread))
    assert len(out) == 5
    for i, b in enumerate(out):
        assert isinstance(b["x"], jax.Array) and isinstance(b["y"], jax.Array)
        assert b["x"].devices() == {jax.local_devices()[0]}
        np.testing.assert_array_equal(np.asarray(b["x"]), np.full((4, 3), i, np.float32))
        assert b["y"].dtype == np.int32


def test_string_and_none_leaves_pass_through():
    gen = ({"x": np.zeros((2, 2)), "path": ["a.jpg", "b.jpg"], "meta": None} for _ in range(2))
    b = next(iter(prefetch_to_device(gen)))
    assert b["path"] == ["a.jpg", "b.jpg"] and b["meta"] is None
    assert isinstance(b["x"], jax.Array)


def test_rejects_bad_arguments_with_the_remedy():
    with pytest.raises(ValueError, match="size must be >= 1"):
        prefetch_to_device(batches(1), size=0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    with pytest.raises(ValueError, match="not both"):
        prefetch_to_device(batches(1), devices=jax.devices()[:1], sharding=sharding)


def test_devices_mode_names_the_leaf_its_shape_and_the_remedy():
    gen = ({"image": np.zeros((4, 2, 2))} for _ in range(1))
    with pytest.raises(ValueError, match=r"leaf \['image'\] has shape \(4, 2, 2\).*len\(devices\)=1.*reshape"):
        list(prefetch_to_device(gen, devices=jax.local_devices()[:1]))


def test_sharding_over_a_one_device_mesh_returns_global_arrays():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = list(prefetch_to_device(batches(3), sharding=sharding))
    assert [b["x"].sharding for b in out] == [sharding] * 3
    np.testing.assert_array_equal(np.asarray(out[2]["y"]), np.arange(4) + 2)


def test_state_dict_is_none_without_a_stateful_source():
    it = prefetch_to_device(batches(3))
    next(it)
    assert it.state_dict() is None


@pytest.mark.parametrize("thread", [False, True])
def test_state_dict_is_the_position_of_what_the_caller_received(thread):
    source = ap.ArraySource({"x": np.arange(40.0)})
    with ap.Loader(source, 4, workers=0, slots=8) as loader:  # room for size=3 with the thread
        before = loader.state_dict()
        it = prefetch_to_device(loader, size=3, thread=thread)
        # Nothing received yet, though batches were pulled: the iteration's start.
        assert {**it.state_dict(), "end_epoch": None} == before and it.state_dict()["end_epoch"] == 1
        next(it)
        next(it)
        assert it.state_dict()["batch"] == 2
        if thread:  # the loader itself ran ahead, by at most size + 1
            assert 2 <= loader.state_dict()["batch"] <= 6
        else:
            assert loader.state_dict()["batch"] == 5
        it.close()


@pytest.mark.parametrize("thread", [False, True])
def test_resuming_from_state_dict_repeats_nothing_and_skips_nothing(thread):
    source = ap.ArraySource({"x": np.arange(60.0)})
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=3) as loader:
        full = [np.asarray(b["x"]).tolist() for b in prefetch_to_device(loader, size=2)]
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=3) as loader:
        it = prefetch_to_device(loader, size=2, thread=thread)
        first = [np.asarray(next(it)["x"]).tolist() for _ in range(6)]
        state = it.state_dict()
        it.close()
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=3) as loader:
        loader.load_state_dict(state)
        rest = [np.asarray(b["x"]).tolist() for b in prefetch_to_device(loader, size=2)]
    assert first + rest == full


@pytest.mark.parametrize("thread", [False, True])
@pytest.mark.filterwarnings("ignore:prefetch_to_device.*holds up to:RuntimeWarning")
def test_arrays_received_from_a_three_slot_ring_never_change_afterwards(thread):
    source = ap.ArraySource({"x": np.arange(400, dtype=np.float32).reshape(100, 4)})
    received = []
    with ap.Loader(source, 5, workers=2, slots=3) as loader:
        for b in prefetch_to_device(loader, size=2, thread=thread):
            received.append((b["x"], np.array(b["x"], copy=True)))
    del loader
    gc.collect()
    assert len(received) == 20
    for i, (array, snapshot) in enumerate(received):
        np.testing.assert_array_equal(np.asarray(array), snapshot)
        np.testing.assert_array_equal(snapshot, source[slice(5 * i, 5 * i + 5)]["x"])


def test_a_shape_that_changes_after_the_first_batch_is_still_checked():
    gen = (np.zeros((n, 2), np.float32) for n in (1, 1, 2))
    it = prefetch_to_device(gen, devices=jax.local_devices()[:1], thread=False)
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*len\(devices\)=1"):
        list(it)


def run_with_devices(code: str, devices: int = 8, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter whose CPU backend has ``devices`` devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_devices_mode_matches_flax_placement_and_values_on_eight_devices():
    pytest.importorskip("flax")
    out = run_with_devices("""
        import numpy as np, jax
        from flax import jax_utils
        from agnostic_prefetch.device import prefetch_to_device
        devices = jax.local_devices()
        assert len(devices) == 8
        def gen():
            for i in range(3):
                yield {"x": np.arange(8 * 6, dtype=np.float32).reshape(8, 2, 3) + i,
                       "y": np.arange(8, dtype=np.int32) * (i + 1)}
        ours = list(prefetch_to_device(gen(), 2, devices=devices))
        flax = list(jax_utils.prefetch_to_device(gen(), 2, devices=devices))
        for j, (a, b, host) in enumerate(zip(ours, flax, gen(), strict=True)):
            for k in ("x", "y"):
                assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
                pa = {s.device: (s.index, np.asarray(s.data)) for s in a[k].addressable_shards}
                pb = {s.device: (s.index, np.asarray(s.data)) for s in b[k].addressable_shards}
                assert pa.keys() == pb.keys() == set(devices)
                for i, d in enumerate(devices):  # row i on device i, as with flax
                    assert pa[d][0] == pb[d][0] and pa[d][0][0] == slice(i, i + 1, None)
                    np.testing.assert_array_equal(pa[d][1], pb[d][1])
                    np.testing.assert_array_equal(pa[d][1][0], host[k][i])
        print("OK")
    """)
    assert "OK" in out


def test_sharding_splits_the_batch_axis_over_a_mesh_and_refuses_an_indivisible_batch():
    out = run_with_devices("""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from agnostic_prefetch.device import prefetch_to_device
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        sharding = NamedSharding(mesh, P("data"))
        gen = ({"x": np.arange(16, dtype=np.float32).reshape(8, 2)} for _ in range(2))
        for b in prefetch_to_device(gen, sharding=sharding):
            assert b["x"].sharding == sharding
            for s in b["x"].addressable_shards:
                assert s.data.shape == (2, 2)
                np.testing.assert_array_equal(np.asarray(s.data), np.asarray(b["x"])[s.index])
        short = ({"x": np.zeros((6, 2), np.float32)} for _ in range(1))
        try:
            list(prefetch_to_device(short, sharding=sharding))
        except ValueError as e:
            msg = str(e)
            assert "['x']" in msg and "(6, 2)" in msg and "drop_remainder=True" in msg, msg
            print("OK")
    """)
    assert "OK" in out


@pytest.mark.gpu
@pytest.mark.parametrize("thread", [False, True])
def test_on_a_gpu_batches_land_intact_resume_exactly_and_never_change_under_ring_reuse(thread):
    if jax.default_backend() != "gpu":
        pytest.skip(f"needs JAX on a GPU (the default backend here is {jax.default_backend()})")
    source = ap.ArraySource({"x": np.arange(40000, dtype=np.float32).reshape(1000, 40)})
    with ap.Loader(source, 50, workers=2, shuffle=True, seed=1) as loader:  # 8 slots, 20 batches
        it = prefetch_to_device(loader, size=2, thread=thread)
        received = [next(it) for _ in range(7)]
        it.load_state_dict(it.state_dict())
        received += list(it)
        assert loader.stats()["copied_out"] == 0
    with ap.Loader(source, 50, workers=0, shuffle=True, seed=1) as reference:
        want = [b["x"].copy() for b in reference]
    assert len(received) == len(want) == 20
    for batch, expected in zip(received, want, strict=True):
        assert next(iter(batch["x"].devices())).platform == "gpu"
        np.testing.assert_array_equal(np.asarray(batch["x"]), expected)  # unchanged, though slots were reused


def test_a_flax_loop_with_default_arguments_copies_nothing_out_and_warns_about_nothing(caplog):
    # A plain flax/optax loop that never forces a value: JAX's asynchronous dispatch queues
    # steps ahead of their execution, and each queued step keeps its input batch alive.
    flax_linen = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    class Model(flax_linen.Module):
        @flax_linen.compact
        def __call__(self, x):
            for _ in range(3):
                x = flax_linen.tanh(flax_linen.Dense(512)(x))
            return flax_linen.Dense(10)(x)

    model, tx = Model(), optax.sgd(0.01)
    rng = np.random.default_rng(0)
    source = ap.ArraySource({"x": rng.random((1024, 512), dtype=np.float32), "y": np.arange(1024) % 10})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 512)))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.apply(p, batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        with ap.Loader(source, 32, workers=2, epochs=3, shuffle=True) as loader:
            for batch in prefetch_to_device(loader):
                params, opt_state, loss = step(params, opt_state, batch)
            assert np.isfinite(float(loss))
            stats = loader.stats()
    assert stats["batches"] == 96 and stats["copied_out"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_on_the_cpu_a_short_ring_makes_the_stage_copy_in_its_thread_not_the_loader_in_next():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "too few slots" warning: the stage copies when it must
        with ap.Loader(ap.ArraySource({"x": np.arange(64.0)}), 8, workers=1, slots=3) as loader:
            kept = list(prefetch_to_device(loader, size=1))  # every batch held: more than the ring has
            assert loader.stats()["copied_out"] == 0 and loader.stats()["held_peak"] <= 2
    assert [np.asarray(b["x"]).tolist() for b in kept] == [list(range(k, k + 8)) for k in range(0, 64, 8)]


def test_on_the_cpu_a_batch_is_the_rings_memory_while_the_ring_has_room():
    from agnostic_prefetch._testing import internals

    x = np.arange(64, dtype=np.float32)  # (a float64 leaf would be converted, so copied, by JAX)
    with ap.Loader(ap.ArraySource({"x": x}), 8, workers=1) as loader:
        ring = internals(loader).ring
        for batch in prefetch_to_device(loader, size=2):
            assert ring.address <= batch["x"].unsafe_buffer_pointer() < ring.address + ring.nbytes
