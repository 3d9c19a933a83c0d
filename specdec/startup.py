"""A service that cannot start says why in one line and exits 1, instead of a Python traceback.

Why it exists: the three services fail to start for the same operator-facing reasons (a model folder
or TLS file that is not there, a port already taken, Triton refusing the model), and an operator reading a
pod's log needs the reason, not the stack of our code that found it. Only those reasons are caught
(OSError, ValueError, RuntimeError; TimeoutError is an OSError): anything else is a bug of ours and keeps
its traceback. The traceback of a caught one still goes to the log at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

STARTUP_ERRORS = (OSError, ValueError, RuntimeError)


@contextlib.contextmanager
def exit_if_startup_fails(log: logging.Logger) -> Iterator[None]:
    """Around a service's start-up: an error of `STARTUP_ERRORS` is logged as ``cannot start: <why>`` at
    ERROR, and the process exits with status 1 (SystemExit)."""
    try:
        yield
    except STARTUP_ERRORS as exc:
        log.debug("start-up failed", exc_info=True)
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
