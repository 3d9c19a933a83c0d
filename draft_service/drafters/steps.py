"""One thread that runs the next model step of every stream that is waiting, in one forward.

Why it exists: the draft service runs one thread per open Propose stream, and a model draft of K tokens is
K forwards. Run from each stream's thread, 8 streams cost 8 forwards per step; here every job that is
waiting for a forward joins the next one (continuous batching at the step level): the engine runs them all
at once (`specdec.engine.CausalLMEngine.step`), and each job moves on with its own logits. A job that
arrives mid-draft of others joins at the next step. Each stream still waits for its own round, so the
per-stream order of rounds and the release of a sequence after its last round are unchanged.

A job is a generator: it yields `StepItem`s, receives each one's logits (or the ValueError that refused
it), and returns its result; `StepLoop.run` blocks the calling thread until then. A job whose caller no
longer waits (its Propose stream was cancelled) is closed before its next forward and fails with
`JobCancelled`: a cancelled generation's prompt and drafts would otherwise hold every other stream's
steps back for an answer nobody reads. A forward runs at most
``budget`` tokens (`specdec.forward_budget`): a job's long item (a prompt caught up) runs in chunks over
several forwards beside the others' draft steps, and the job gets its logits after the last chunk.

`StepLoop.stalled_s` says how long the loop has held work without a forward ending: the service reports
itself not serving when that grows past its stall timeout (``draft_service.watchdog``), as a forward stuck
in a hung kernel or a deadlock would make it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from specdec.engine import CausalLMEngine, StepItem
from specdec.forward_budget import share
from specdec.openmp import use_threads_here
from specdec.procs import name_this_thread

log = logging.getLogger(__name__)

R = TypeVar("R")
Job = Generator[StepItem, "torch.Tensor | ValueError", R]

FORWARD_THREAD = "draft-steps"  # the loop's thread, which runs every forward; its OS-level name too


class JobCancelled(Exception):
    """The job's caller stopped waiting for it; it was closed without running its remaining steps."""


class _Waiting:
    def __init__(self, job: Job, future: Future, waiting: Callable[[], bool]) -> None:
        self.job, self.future, self.waiting = job, future, waiting
        self.item: StepItem | None = None

    def cancelled(self) -> bool:
        """True (and the job closed, its future failed) if its caller no longer waits."""
        if self.waiting():
            return False
        self.job.close()  # GeneratorExit at its yield: its own cleanup runs
        self.future.set_exception(JobCancelled("the caller stopped waiting"))
        return True

    def advance(self, result: Any) -> bool:
        """Send the job its step's result (None to start it); False once it has finished."""
        try:
            self.item = next(self.job) if result is None else self.job.send(result)
            return True
        except StopIteration as done:
            self.future.set_result(done.value)
        except BaseException as exc:  # noqa: BLE001 - the job's failure is its caller's answer
            self.future.set_exception(exc)
        return False


class StepLoop:
    """Batches the steps of concurrent jobs over one engine; ``on_forward(n)`` hears each forward's size."""

    def __init__(
        self, engine: CausalLMEngine, threads: int = 0, on_forward: Callable[[int], None] = lambda sequences: None,
        budget: int = 0,
    ) -> None:
        self.engine = engine
        self._on_forward = on_forward
        self._budget = budget
        self._arrived: list[_Waiting] = []
        self._held = 0  # jobs the loop's thread has taken and not finished (with _arrived: the work it has)
        self._progress_at = time.monotonic()  # a forward ended, or work came to an idle loop (`stalled_s`)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, args=(threads,), name=FORWARD_THREAD, daemon=True)
        self._thread.start()

    def run(self, job: Job[R], waiting: Callable[[], bool] = lambda: True) -> R:
        """Run ``job`` to its end with the other jobs' steps; its result, or the exception it raised
        (`JobCancelled` once ``waiting()`` is False before one of its forwards)."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the draft service is stopping")
            if not self._arrived and not self._held:
                self._progress_at = time.monotonic()  # an idle loop's stall starts now, not at its last forward
            self._arrived.append(_Waiting(job, future, waiting))
            self._wake.notify()
        return future.result()

    def stalled_s(self) -> float:
        """Seconds the loop has had work without moving on (no forward ended since the oldest work came); 0
        while idle. Grows with a forward that does not return; a healthy loop's is at most one forward."""
        if not self._wake.acquire(timeout=1.0):  # its thread stopped while holding the lock: it is stuck too
            return time.monotonic() - self._progress_at
        try:
            return time.monotonic() - self._progress_at if self._arrived or self._held else 0.0
        finally:
            self._wake.release()

    def stop(self) -> None:
        """Fail the jobs not yet finished and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _loop(self, threads: int) -> None:
        name_this_thread(self._thread.name)  # `top -H` and /proc show which of the process's threads runs forwards
        use_threads_here(threads)  # OpenMP's thread count is per calling thread
        running: list[_Waiting] = []
        while True:
            with self._wake:
                self._held = len(running)
                while not self._arrived and not running and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for waiting in running + self._arrived:
                        waiting.future.set_exception(RuntimeError("the draft service is stopping"))
                    return
                self._held += len(self._arrived)
                arrived, self._arrived = self._arrived, []
            running += [waiting for waiting in arrived if waiting.advance(None)]  # up to its first item
            running = [waiting for waiting in running if not waiting.cancelled()]
            if not running:
                continue
            now = [(waiting, take) for waiting, take in zip(running, self._share(running)) if take is not None]
            items = [_first(waiting.item, take) for waiting, take in now]
            try:
                self._on_forward(len(items))
                results: list[Any] = self.engine.step(items)
            except Exception as exc:  # noqa: BLE001 - a failed forward fails the jobs in it, not the loop
                log.exception("a draft forward of %d sequences failed", len(items))
                results = [exc] * len(items)
            with self._wake:
                self._progress_at = time.monotonic()
            done: set[int] = set()
            for (waiting, take), item, result in zip(now, items, results):
                if item is not waiting.item and not isinstance(result, BaseException):  # a chunk: the rest next
                    waiting.item = _rest(waiting.item, take)
                elif not waiting.advance(result):
                    done.add(id(waiting))
            running = [waiting for waiting in running if id(waiting) not in done]

    def _share(self, running: list[_Waiting]) -> list[int | None]:
        """What each running job's item runs in the next forward (`specdec.forward_budget.share`)."""
        sizes = []
        for waiting in running:
            assert waiting.item is not None  # a running job always has its next item
            sizes.append((len(waiting.item.token_ids), waiting.item.num_logits))
        return share(sizes, self._budget)


def _first(item: StepItem | None, take: int) -> StepItem:
    """The item, or its first ``take`` tokens as a chunk (no logits)."""
    assert item is not None
    if take == len(item.token_ids):
        return item
    return StepItem(item.cache, item.keep_length, item.token_ids[:take], 0)


def _rest(item: StepItem | None, take: int) -> StepItem:
    """What is left of the item after its first ``take`` tokens ran."""
    assert item is not None
    return StepItem(item.cache, item.keep_length + take, item.token_ids[take:], item.num_logits)
