"""Whole-program behaviour in real subprocesses: the __main__ trap, Ctrl-C, exit, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def blocked_in_select(pid: int, seconds: float = 10.0) -> bool:
    """Whether process ``pid``'s main thread came to wait in the kernel for a descriptor
    (epoll, select or poll: the loader waiting for its workers) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if any(w in f.read() for w in ("epoll", "select", "poll")):
                    return True
        except OSError:
            return False
        time.sleep(0.001)
    return False


def shm_names():
    return {n for n in os.listdir("/dev/shm") if "agnostic_prefetch" in n} if os.path.isdir("/dev/shm") else set()


def test_script_without_main_guard_runs_its_top_level_once(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "helper_module.py").write_text("def double(x):\n    return 2 * x\n")
    counter = tmp_path / "top_level_ran"
    (project / "train.py").write_text(textwrap.dedent(f"""
        import numpy as np
        import agnostic_prefetch as ap
        from helper_module import double   # found through the script's own directory

        with open({str(counter)!r}, "a") as f:
            f.write("ran\\n")

        class Squares:                      # defined in __main__: travels by value
            def __len__(self):
                return 10
            def __getitem__(self, i):
                return {{"x": np.float32(double(i) ** 2)}}

        loader = ap.Loader(Squares(), 5, workers=2, transform=lambda ex, rng: {{"x": ex["x"] + 1}})
        print([b["x"].tolist() for b in loader])
        loader.close()
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(project / "train.py")], cwd=elsewhere,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([[1.0, 5.0, 17.0, 37.0, 65.0], [101.0, 145.0, 197.0, 257.0, 325.0]])
    assert counter.read_text() == "ran\n"


SLOW_SCRIPT = """
import os, sys, time
import numpy as np
import agnostic_prefetch as ap

class Slow:
    def __len__(self):
        return 100
    def __getitem__(self, i):
        time.sleep(0 if i < 2 else 60)
        return {"x": np.zeros(4)}

loader = ap.Loader(Slow(), 2, workers=2)
print(" ".join(map(str, loader.worker_pids)), flush=True)
it = iter(loader)
next(it)
MODE = sys.argv[1]
if MODE == "exit":
    sys.exit(0)           # interpreter exit with a live loader
if MODE == "other-thread":  # Ctrl-C delivered to another thread of the process (a BLAS one, say)
    import signal, threading
    def interrupt_me():
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    threading.Thread(target=interrupt_me, daemon=True).start()
print("blocked", flush=True)
next(it)                  # blocks: the next record takes a minute
"""


def start(tmp_path, mode):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stderr.read()
    return proc, pids


def test_sigint_to_the_process_group_while_blocked_stops_everything(tmp_path):
    before = shm_names()
    proc, pids = start(tmp_path, "block")
    try:
        assert proc.stdout.readline().strip() == "blocked"
        assert blocked_in_select(proc.pid), "the child never blocked waiting for its worker"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert wait_gone(pids) == []
    assert shm_names() <= before


def test_a_ctrl_c_that_another_thread_receives_still_stops_a_blocked_loop_within_a_second(tmp_path):
    proc, pids = start(tmp_path, "other-thread")
    try:
        assert proc.stdout.readline().strip() == "blocked"
        started = time.monotonic()
        proc.wait(timeout=20)
        assert time.monotonic() - started < 3.0
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert wait_gone(pids) == []


def test_interpreter_exit_with_a_live_loader_stops_its_workers(tmp_path):
    before = shm_names()
    proc, pids = start(tmp_path, "exit")
    assert proc.wait(timeout=20) == 0
    assert wait_gone(pids) == []
    assert shm_names() <= before


def test_sigkill_of_the_parent_takes_the_workers_down(tmp_path):
    before = shm_names()
    proc, pids = start(tmp_path, "block")
    try:
        assert proc.stdout.readline().strip() == "blocked"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert wait_gone(pids, seconds=3) == []
    assert shm_names() <= before


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd on this OS")
def test_the_ring_has_no_name_in_dev_shm_while_running(tmp_path):
    before = shm_names()
    proc, pids = start(tmp_path, "block")
    try:
        assert proc.stdout.readline().strip() == "blocked"
        assert shm_names() <= before
        maps = open(f"/proc/{pids[0]}/maps").read()
        assert "memfd:agnostic_prefetch_ring" in maps  # the workers map the anonymous file
    finally:
        proc.kill()
        proc.wait()
    assert wait_gone(pids, seconds=3) == []


def test_a_worker_runs_this_package_even_when_the_working_directory_holds_another(tmp_path, monkeypatch):
    import numpy as np

    import agnostic_prefetch as ap

    impostor = tmp_path / "agnostic_prefetch"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('the checkout in the working directory')\n")
    monkeypatch.chdir(tmp_path)
    with ap.Loader(ap.ArraySource({"x": np.arange(6)}), 2, workers=1) as loader:
        assert [b["x"].tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]
