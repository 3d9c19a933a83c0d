"""The load phase: many generations in flight from one client process, as backend services call us.

Why this module exists: a service's capacity is its aggregate tokens/s when many callers wait at once, and
its callers' experience is the per-token latency they see meanwhile. For each concurrency c, c worker
threads each run one generation after another (a closed loop, like ghz's ``--concurrency``) until the
cell's generations are done; the cell's throughput is its tokens over its wall time, and Triton's counters
say how many sequences each forward pass carried. A last run cancels generations mid-flight and then checks
that both servers come back to zero live sequences and their idle KV memory: a leak shows there first.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from bench import client
from bench.arms import Arm, Record
from specdec.sampling import SamplingParams
from specdec.v1 import generation_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One (workload, arm, concurrency) of the load phase."""

    workload: str
    arm: str
    concurrency: int
    generations: int
    tokens: int
    wall_s: float  # first call to last answer
    forwards: float  # Triton's forward passes meanwhile
    forward_sequences: float  # sequences in them
    forward_s: float = 0.0  # the model answering them (Triton's counter)
    wait_s: float = 0.0  # forwards held back for sequences on their way back
    lookup_drafted: float = 0.0  # draft tokens the target looked up for decodes
    lookup_accepted: float = 0.0  # and of those, accepted
    prompt_tokens: float = 0.0  # tokens of the prompts the target started (with its prefix cache on)
    reused_tokens: float = 0.0  # and of those, copied from a shared prompt head instead of computed
    rounds: int = 1  # the rounds merged into it, each of generations / rounds (items r * that, ...)

    @classmethod
    def merged(cls, cells: Sequence[Cell]) -> Cell:
        """One cell from the rounds of the same (workload, arm, concurrency): their sums."""
        first = cells[0]
        return cls(first.workload, first.arm, first.concurrency, rounds=len(cells),
                   **{name: sum(getattr(c, name) for c in cells) for name in _SUMMED})

    def round_of(self, item: int) -> int:
        """The round a generation of this cell ran in (``first=r * generations`` in `run_cell`)."""
        return item // max(1, self.generations // self.rounds)

    @property
    def busy(self) -> float:
        """The share of the wall time the Triton model spent answering batches."""
        return self.forward_s / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def sequences_per_forward(self) -> float:
        return self.forward_sequences / self.forwards if self.forwards else float("nan")


_SUMMED = ("generations", "tokens", "wall_s", "forwards", "forward_sequences", "forward_s", "wait_s",
           "lookup_drafted", "lookup_accepted", "prompt_tokens", "reused_tokens")


def run_cell(stub: generation_pb2_grpc.GenerationServiceStub, servers: client.ServerReader, arm: Arm,
             params: SamplingParams, prompts: Sequence[Sequence[int]], concurrency: int, generations: int,
             max_new_tokens: int, seed: int, workload: str, mode: str, first: int = 0) -> tuple[Cell, list[Record]]:
    """``generations`` generations (prompts in turn, items ``first``, ``first`` + 1, ...) with ``concurrency``
    in flight."""
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(first, first + generations):
        jobs.put(i)
    records: list[Record] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            message = client.request(arm, prompts[i % len(prompts)], params, max_new_tokens, seed + i)
            response, wall_ms = client.generate(stub, message)
            record = client.to_record(response, wall_ms, phase="load", workload=workload, mode=mode, arm=arm.label,
                                      item=i, concurrency=concurrency)
            with lock:
                records.append(record)

    before = servers.triton()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="load") as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall_s = time.perf_counter() - start
    spent = servers.triton() - before
    records.sort(key=lambda r: r.item)
    cell = Cell(workload, arm.label, concurrency, len(records), sum(r.tokens for r in records), wall_s,
                spent.forwards, spent.forward_sequences, spent.forward_s, spent.wait_s, spent.lookup_drafted,
                spent.lookup_accepted, spent.prompt_tokens, spent.reused_tokens)
    log.info("load %s %s c=%d: %.1f tok/s, %.2f sequences per forward", workload, arm.label, concurrency,
             cell.tokens_per_s, cell.sequences_per_forward)
    return cell, records


@dataclass(frozen=True)
class CancelRun:
    """The cancellation run and what the servers held before the load phase and after it."""

    calls: int
    concurrency: int
    cancelled: int
    completed: int
    failed: int  # ended with a status other than CANCELLED
    before: client.Occupancy  # idle, before the load phase
    peak: client.Occupancy  # read while the cancellation run was in flight
    after: client.Occupancy  # once both servers were idle again (or the wait timed out)
    drain_s: float  # from the last call's end to idle


def cancel_run(stub: generation_pb2_grpc.GenerationServiceStub, servers: client.ServerReader, arms: Sequence[Arm],
               params: SamplingParams, prompts: Sequence[Sequence[int]], calls: int, concurrency: int,
               max_new_tokens: int, seed: int, before: client.Occupancy,
               progress: Callable[[str], None] = lambda _: None) -> CancelRun:
    """``calls`` generations (the ``arms`` in turn), ``concurrency`` in flight, each cancelled by its caller
    after a random 0.2-3 s (many mid-generation, some before their first round, some after they finished)."""
    rng = random.Random(seed)
    outcomes = {"cancelled": 0, "completed": 0, "failed": 0}
    peak: list[client.Occupancy] = []
    slots = threading.Semaphore(concurrency)
    done = threading.Event()
    remaining = [calls]
    lock = threading.Lock()

    def finished(future: grpc.Future) -> None:
        if future.cancelled():
            key = "cancelled"
        else:
            key = "completed" if future.exception() is None else "failed"
            if key == "failed" and future.exception().code() == grpc.StatusCode.CANCELLED:
                key = "cancelled"
        with lock:
            outcomes[key] += 1
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()
        slots.release()
        progress("cancellations")

    for i in range(calls):
        slots.acquire()
        message = client.request(arms[i % len(arms)], prompts[i % len(prompts)], params, max_new_tokens, seed + i)
        future = stub.Generate.future(message, timeout=client.TIMEOUT_S)
        threading.Timer(rng.uniform(0.2, 3.0), future.cancel).start()
        future.add_done_callback(finished)
        if i == calls // 2:
            peak.append(servers.occupancy())
    done.wait()
    after, drain_s = servers.wait_idle()
    log.info("cancellation run: %s; drained in %.1f s to %s", outcomes, drain_s, after)
    return CancelRun(calls, concurrency, outcomes["cancelled"], outcomes["completed"], outcomes["failed"], before,
                     peak[0] if peak else after, after, drain_s)
