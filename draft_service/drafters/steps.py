"""One thread that runs the next model step of every stream that is waiting, in one forward.

Why it exists: the draft service runs one thread per open Propose stream, and a model draft of K tokens is
K forwards. Run from each stream's thread, 8 streams cost 8 forwards per step; here every job that is
waiting for a forward joins the next one (continuous batching at the step level): the engine runs them all
at once (`specdec.engine.CausalLMEngine.step`), and each job moves on with its own logits. A job that
arrives mid-draft of others joins at the next step. Each stream still waits for its own round, so the
per-stream order of rounds and the release of a sequence after its last round are unchanged.

A job is a generator: it yields `StepItem`s, receives each one's logits (or the ValueError that refused
it), and returns its result; `StepLoop.run` blocks the calling thread until then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from specdec.engine import CausalLMEngine, StepItem
from specdec.openmp import use_threads_here

log = logging.getLogger(__name__)

R = TypeVar("R")
Job = Generator[StepItem, "torch.Tensor | ValueError", R]


class _Waiting:
    def __init__(self, job: Job, future: Future) -> None:
        self.job, self.future = job, future
        self.item: StepItem | None = None

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
        self, engine: CausalLMEngine, threads: int = 0, on_forward: Callable[[int], None] = lambda sequences: None
    ) -> None:
        self.engine = engine
        self._on_forward = on_forward
        self._arrived: list[_Waiting] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, args=(threads,), name="draft-steps", daemon=True)
        self._thread.start()

    def run(self, job: Job[R]) -> R:
        """Run ``job`` to its end with the other jobs' steps; its result, or the exception it raised."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the draft service is stopping")
            self._arrived.append(_Waiting(job, future))
            self._wake.notify()
        return future.result()

    def stop(self) -> None:
        """Fail the jobs not yet finished and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _loop(self, threads: int) -> None:
        use_threads_here(threads)  # OpenMP's thread count is per calling thread
        running: list[_Waiting] = []
        while True:
            with self._wake:
                while not self._arrived and not running and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for waiting in running + self._arrived:
                        waiting.future.set_exception(RuntimeError("the draft service is stopping"))
                    return
                arrived, self._arrived = self._arrived, []
            running += [waiting for waiting in arrived if waiting.advance(None)]
            if not running:
                continue
            items = [waiting.item for waiting in running]
            try:
                self._on_forward(len(items))
                results: list[Any] = self.engine.step(items)
            except Exception as exc:  # noqa: BLE001 - a failed forward fails the jobs in it, not the loop
                log.exception("a draft forward of %d sequences failed", len(items))
                results = [exc] * len(items)
            running = [waiting for waiting, result in zip(running, results) if waiting.advance(result)]
