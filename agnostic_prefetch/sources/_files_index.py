"""Several files as one index space: where index ``i`` falls, from the files' first indices.

Example:
    >>> import numpy as np
    >>> place(np.array([0, 3, 5]), 4, "a source")
    (1, 1)
"""

from __future__ import annotations

import numpy as np

__all__ = ["place"]


def place(starts: np.ndarray, index: int, owner: object) -> tuple[int, int]:
    """(file number, position within that file) of ``index``; ``starts`` holds each file's
    first index and then the total.

    Raises:
        IndexError: an index outside ``range(total)``, naming ``owner``.
    """
    total = int(starts[-1])
    if not 0 <= index < total:
        raise IndexError(f"index {index} out of range for {total} records in {owner!r}")
    f = int(np.searchsorted(starts, index, side="right")) - 1
    return f, index - int(starts[f])
