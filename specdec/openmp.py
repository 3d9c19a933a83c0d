"""Torch's OpenMP threads in model processes that share CPU cores: how long they spin, and which thread owns them.

Why it exists: torch's CPU wheels use GNU OpenMP (libgomp). After every parallel region its threads
busy-wait for ``GOMP_SPINCOUNT`` iterations before sleeping, so the next region starts without a wake-up;
a region that finds them asleep pays a futex wake-up per worker, which on a virtual machine can cost more
than the region itself. How long the count lasts depends on the CPU and on how far apart a forward's
regions are, so the two model processes get different counts for different reasons:

* **The target** (`TARGET_SPINCOUNT`, libgomp's own default, 300,000): its forwards are most of a round and
  its regions must stay back to back. 20,000 was enough on one machine and let the workers fall asleep
  between a forward's regions on another, where the Triton model then ran 7 % slower per token than the
  same model in-process (bench/README.md, "Design measurements").
* **The draft service** (`DRAFT_SPINCOUNT`, 20,000): its model drafter takes turns with the target, and
  its workers must let go of the cores right after a draft, before the target's forward starts.

libgomp reads the variable once, when it loads (with torch), so it must be in the environment a model
process starts with: the Triton launcher puts the target's in its children's environment, and
``python -m draft_service`` sets its own before importing torch. A value already set wins (an operator's,
for every process). GPU models barely use OpenMP; the setting is harmless there.

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
TARGET_SPINCOUNT = "300000"
DRAFT_SPINCOUNT = "20000"


def set_spin(env: MutableMapping[str, str], count: str) -> None:
    """Set GOMP_SPINCOUNT in ``env`` to ``count`` unless it is set already."""
    env.setdefault(SPINCOUNT_VARIABLE, count)


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
