"""A service that cannot start says why in one line and exits 1, instead of a Python traceback; one told to
stop while it starts stops then, not once it is up.

Why it exists: the three services fail to start for the same operator-facing reasons (a model folder
or TLS file that is not there, a port already taken, Triton refusing the model), and an operator reading a
pod's log needs the reason, not the stack of our code that found it. Only those reasons are caught
(OSError, ValueError, RuntimeError; TimeoutError is an OSError): anything else is a bug of ours and keeps
its traceback. The traceback of a caught one still goes to the log at DEBUG.

`StopSignals`: a service's start can wait minutes (Triton loading a big model, ``specdec serve`` starting
three services) without looking at its stop flag; a SIGTERM from Kubernetes or a Ctrl-C meanwhile must end
it there, stopping what it had started, not after it has come up.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterable, Iterator

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


class StopSignals:
    """``signals`` set `stop`; until `serving` is called, the first one also ends the start-up where it waits
    (SystemExit(0), so the ``with`` blocks and ``except BaseException`` clean-ups on the way stop what was
    started). A second signal only sets the flag again: it cannot cut that clean-up short. Main thread only
    (Python runs signal handlers there)."""

    def __init__(
        self, log: logging.Logger, signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    ) -> None:
        self.stop = threading.Event()
        self._log = log
        self._serving = False
        for sig in signals:
            signal.signal(sig, self.handle)

    def serving(self) -> None:
        """Start-up is over: from now on a signal only sets `stop`, for the serving loop to see."""
        self._serving = True

    def handle(self, signum: int, _frame: object = None) -> None:
        first = not self.stop.is_set()
        self.stop.set()
        if first and not self._serving:
            self._log.info("received %s while starting: stopping what has started", signal.Signals(signum).name)
            raise SystemExit(0)
        self._log.info("received %s: stopping", signal.Signals(signum).name)
