"""An exclusive inter-process file lock, for one-time work several processes may start at once.

The draft service and the Triton model start together and may both find the packaged SmolLM2 not yet
converted, or the Triton folder not yet copied; the first one does the work under this lock, the others
wait and then find it done. (A module of its own so the Triton launcher needs no torch import.)
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the duration of the block."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
