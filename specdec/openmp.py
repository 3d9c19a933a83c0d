"""Torch's OpenMP threads in model processes that share CPU cores: how long they spin, and which thread owns them.

Why it exists: torch's CPU wheels use GNU OpenMP (libgomp). After every parallel region its threads
busy-wait for ``GOMP_SPINCOUNT`` iterations (300,000 by default) before sleeping, so the next region
starts without a wake-up. In our stack the draft and the target take turns: when one finishes a round,
its OpenMP threads keep spinning on cores that the other model, the orchestrator and the gRPC threads
need right then. 20,000 keeps a forward's parallel regions back to back and lets go of the core within
tens of microseconds after it; 2,000 is too short (threads fall asleep between the layers' regions). The
measurements behind the choice are in bench/README.md, "Design measurements".

libgomp reads the variable once, when it loads (with torch), so it must be in the environment a model
process starts with: `cli.stack` and the Triton launcher put it in their children's environment, and
``python -m draft_service`` sets it for itself before importing torch. A value already set wins. GPU
models barely use OpenMP; the setting is harmless there.

Which thread owns them: libgomp gives every thread that starts a parallel region a pool of worker threads of
its own, kept until that thread ends. Once a process has more libgomp threads than cores, libgomp stops
spinning altogether (its "throttled" spin count, ~nothing) and every parallel region pays a futex wake-up
per worker. Our model processes load the model on one thread (packing and copying weights run parallel
regions) and run forwards on another (the Triton model's scheduler, the draft's step loop): two pools of two
on 2 cores. Measured: a parallel `torch.add` 12.8 -> 55 us, one SmolLM2 decode step 21 -> 31 ms (the
Triton model ran at 33-40 ms per token in the benchmark for this reason). So `load_model` runs on a thread of
its own (`in_a_thread_of_its_own`): the pool it starts ends with it, and the forward thread's is the only one.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

SPINCOUNT_VARIABLE = "GOMP_SPINCOUNT"
DEFAULT_SPINCOUNT = "20000"


def short_spin(env: MutableMapping[str, str]) -> None:
    """Set GOMP_SPINCOUNT in ``env`` unless it is set already."""
    env.setdefault(SPINCOUNT_VARIABLE, DEFAULT_SPINCOUNT)


def in_a_thread_of_its_own(work: Callable[[], T], name: str = "specdec-openmp-once") -> T:
    """``work()`` on a new thread that ends with it (so do the OpenMP workers it started); its result, or the
    exception it raised. For torch work done once (loading a model) by a process whose forwards run on
    another thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as one:  # its exit joins the thread
        return one.submit(work).result()


def use_threads_here(threads: int) -> None:
    """Set the calling thread's torch/OpenMP thread count (0 = leave the default). OpenMP's count is per
    thread, and ``torch.get_num_threads()`` reports the process-wide value all the same: the thread that runs
    the forwards must set its own."""
    if threads > 0:
        import torch  # here: this module is imported to set GOMP_SPINCOUNT before torch loads

        torch.set_num_threads(threads)
