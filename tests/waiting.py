"""Waiting in tests for a condition, never for a fixed time: a thread blocked inside the
loader, a worker inside a record, a flag set by another thread.

A fixed ``time.sleep`` says "by then it has probably happened"; these say what must have
happened, and return as soon as it has (or fail the test after a generous deadline).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Whether ``condition()`` became true within ``seconds`` (looked at every millisecond)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def inside(thread: threading.Thread, filename_end: str, function: str) -> bool:
    """Whether ``thread`` is now running ``function`` of a file whose name ends ``filename_end``."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == function and code.co_filename.endswith(filename_end):
            return True
        frame = frame.f_back
    return False


def waiting_in_loader(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits inside a loader for its workers (blocked in the supervisor's
    select, or filling a batch itself there with ``workers=0``)."""
    return inside(thread, "_supervisor.py", "wait")


def wait_until_waiting_in_loader(thread: threading.Thread, seconds: float = 10.0) -> None:
    assert eventually(lambda: waiting_in_loader(thread) or not thread.is_alive(), seconds), \
        f"{thread.name} never waited inside the loader"
    assert thread.is_alive(), f"{thread.name} ended instead of waiting inside the loader"
