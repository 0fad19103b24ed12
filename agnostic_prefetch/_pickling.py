"""How a job travels to worker processes: cloudpickle, keeping where each function was written.

cloudpickle sends functions and classes defined in the user's script (``__main__``, a
notebook) by value, and renames the file of their code ``"<dynamic-code>"`` (so that a
payload does not depend on where it was made). A worker's traceback then shows
``File "<dynamic-code>", line 52`` for the user's own transform. Workers run on this
machine, so the real file name is worth more than that determinism: this pickler keeps it,
and the traceback shows the file, the line and (through ``linecache``) the line itself.
"""

from __future__ import annotations

import io
import types
from collections import ChainMap
from typing import Any

import cloudpickle

__all__ = ["dumps"]

_DYNAMIC = "<dynamic-code>"
_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def _code_keeping_its_file(code: types.CodeType) -> Any:
    assert _code_reduce is not None
    rebuild, args = _code_reduce(code)
    return rebuild, tuple(code.co_filename if arg == _DYNAMIC else arg for arg in args)


class _Pickler(cloudpickle.Pickler):
    if _code_reduce is not None:  # a cloudpickle without it keeps its own naming
        dispatch_table = ChainMap({types.CodeType: _code_keeping_its_file}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj)``, with code objects keeping their file name.

    Example:
        >>> import pickle
        >>> f = eval("lambda x: x + 1")  # code made at run time is pickled by value
        >>> pickle.loads(dumps(f)).__code__.co_filename
        '<string>'
    """
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()
