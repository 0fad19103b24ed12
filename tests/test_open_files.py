"""OpenFiles: a process's open handles, bounded, least recently used closed first, never one in use."""

from __future__ import annotations

import io

import pytest

from agnostic_prefetch.sources._open_files import OpenFiles


def opener(key: str) -> io.BytesIO:
    return io.BytesIO(key.encode())


def test_the_least_recently_leased_idle_handle_is_closed_past_the_capacity():
    handles = OpenFiles(2)
    opened = {}
    for key in ("a", "b", "a", "c"):
        with handles.lease(key, opener) as f:
            opened.setdefault(key, f)
    assert handles.keys() == ["a", "c"] and opened["b"].closed and not opened["a"].closed
    handles.close_all()
    assert all(f.closed for f in opened.values())


def test_a_leased_handle_is_never_closed_under_its_user():
    handles = OpenFiles(1)
    with handles.lease("a", opener) as a, handles.lease("b", opener) as b:
        assert not a.closed and not b.closed  # both in use: the cache holds two for now
        handles.close_all()
        assert not a.closed and not b.closed
    assert a.closed and b.closed


def test_idle_handles_that_drop_picks_are_closed_when_another_opens():
    handles = OpenFiles(8, drop=lambda key: key.startswith("gone"))
    with handles.lease("gone-1", opener) as gone:
        pass
    with handles.lease("kept", opener):
        pass
    assert gone.closed and handles.keys() == ["kept"]
    handles.close_all()


def test_a_capacity_under_one_is_refused():
    with pytest.raises(ValueError, match="max_open_files must be at least 1, got 0"):
        OpenFiles(0)
