"""Report the draft service NOT_SERVING while its model's forwards are stuck, and log where they are stuck.

Why it exists: the draft service's gRPC health was set once, at startup, and its RPC threads answer health
checks whatever the model does. A forward that never returns (a hung kernel or driver, a deadlock) left the
replica SERVING while every model round on it waited for the orchestrator's round timeout; and, holding the
fewest live generations, it kept drawing new ones (fleet test (f) without the watchdog: 14 of the next 23
drafting generations, against 9 on the healthy replica). `StepWatchdog` watches the step loop
(`draft_service.drafters.steps.StepLoop.stalled_s`): once it has held work for ``limit_s`` without a forward
ending, the service reports NOT_SERVING, for ``""`` and the DraftService alike, so the orchestrator's health
checks take the replica out and a Kubernetes liveness probe restarts it; every thread's stack goes to the
log once (faulthandler), to show where the forward is stuck. When a forward ends again, SERVING again.
Model-free rounds do not use the step loop and go on answering meanwhile.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def _dump_stacks() -> None:
    faulthandler.dump_traceback(sys.stderr, all_threads=True)


class StepWatchdog:
    """Calls ``set_serving(False)`` once ``stalled_s()`` passes ``limit_s``, ``set_serving(True)`` once it is
    back under; ``check`` does one look (tests call it), ``start`` looks every ``interval_s`` on a thread."""

    def __init__(
        self, stalled_s: Callable[[], float], limit_s: float, set_serving: Callable[[bool], None],
        dump_stacks: Callable[[], None] = _dump_stacks,
    ) -> None:
        if limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {limit_s}")
        self._stalled_s, self.limit_s, self._set_serving, self._dump_stacks = stalled_s, limit_s, set_serving, dump_stacks
        self.stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Look once; True while the loop counts as stalled."""
        stalled_s = self._stalled_s()
        if stalled_s > self.limit_s and not self.stalled:
            self.stalled = True
            log.error("the model's forward loop has had work for %.0f s without finishing a forward: health "
                      "NOT_SERVING until it moves again; every thread's stack follows", stalled_s)
            self._dump_stacks()
            self._set_serving(False)
        elif stalled_s <= self.limit_s and self.stalled:
            self.stalled = False
            log.warning("the model's forward loop moves again: health SERVING")
            self._set_serving(True)
        return self.stalled

    def start(self, interval_s: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="draft-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop looking (before the server reports NOT_SERVING for good: no SERVING after that)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a failed look must not end the watch
                log.exception("the forward-loop watchdog failed to look")
