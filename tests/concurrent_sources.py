"""Sources, transforms and descriptor listings for the tests of many loaders, forks and
inherited descriptors; importable by workers (no test framework imports here)."""

from __future__ import annotations

import os
import subprocess

import numpy as np

import agnostic_prefetch as ap


def numbered(n: int, tag: int = 0) -> ap.ArraySource:
    """Record i is ``{"i": 1000 * tag + i}``: which loader a batch came from shows in it."""
    return ap.ArraySource({"i": np.arange(n, dtype=np.int64) + 1000 * tag})


def with_draw(example, rng):
    """Keeps the index and adds the item's random draw (seeded from seed, epoch, position)."""
    return {"i": example["i"], "draw": rng.random()}


def rows(batches) -> list[tuple[int, float]]:
    """A batch's (index, draw) rows: what two runs must agree on."""
    return [(int(i), float(d)) for batch in batches for i, d in zip(batch["i"], batch["draw"], strict=True)]


def links(pid: int | str = "self") -> dict[int, str]:
    """Process ``pid``'s open descriptors and what each refers to (``pipe:[inode]``, a path...)."""
    found = {}
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            found[int(name)] = os.readlink(f"{folder}/{name}")
        except OSError:  # closed meanwhile (the listing's own descriptor, say)
            continue
    return found


# Run by an unrelated process: what it holds, one "fd target" line each.
LIST_OWN_DESCRIPTORS = (
    "import os\n"
    "for name in os.listdir('/proc/self/fd'):\n"
    "    try: print(name, os.readlink('/proc/self/fd/' + name))\n"
    "    except OSError: pass\n"
)


class ListsItsSubprocessDescriptors:
    """Record i is ``{"pipes": ..., "rings": ...}``: how many pipes (beyond stdin, stdout and
    stderr) and loader rings a process started by the worker's ``__getitem__`` holds; the
    process is started with ``close_fds=False``, so it holds every inheritable descriptor."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        out = subprocess.run(["ls", "-l", "/proc/self/fd"], close_fds=False, capture_output=True,
                             text=True, check=True).stdout
        pipes = rings = 0
        for line in out.splitlines():
            if "->" not in line:
                continue
            fd, target = line.split("->")[0].split()[-1], line.split("->")[1].strip()
            if int(fd) > 2 and target.startswith("pipe:"):
                pipes += 1
            if "agnostic_prefetch" in target:
                rings += 1
        return {"pipes": pipes, "rings": rings}


def note_clean_exit(folder: str, worker_id: int) -> None:
    """A ``worker_init``: the worker writes ``folder/<worker_id>`` as it exits by itself
    (atexit runs on a normal exit, not when the process is killed)."""
    import atexit

    atexit.register(lambda: open(os.path.join(folder, str(worker_id)), "w").close())
