"""specdec.openmp.in_a_thread_of_its_own: torch work done once leaves no OpenMP workers behind.

Why it matters: libgomp keeps a pool of workers per thread that ever started a parallel region; with more
libgomp threads than cores it stops spinning, and every parallel region of the thread running forwards
pays a wake-up (one SmolLM2 step 21 -> 31 ms). Threads are counted in a fresh interpreter, where no
parallel region ran before; the control runs the same work on the main thread and sees the pool stay.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from specdec.openmp import in_a_thread_of_its_own

_COUNT_THREADS = """
import os, sys, time, torch
from specdec.openmp import in_a_thread_of_its_own
torch.set_num_threads(2)
big = torch.empty(4_000_000)  # no parallel region yet
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
def work():  # big enough to run in parallel
    big.fill_(1.0)
    return float(big.sum())
assert (in_a_thread_of_its_own(work) if sys.argv[1] == "own" else work()) == 4_000_000.0
# A finished thread's OpenMP workers exit as it is torn down, just after join(); the control waits 1 s for
# workers that stay.
deadline = time.monotonic() + (5 if sys.argv[1] == "own" else 1)
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.05)
print(before, threads())
"""


def _threads_before_and_after(where: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _COUNT_THREADS, where], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    before, after = map(int, out.stdout.split())
    return before, after


def test_work_on_a_thread_of_its_own_leaves_no_openmp_workers_behind() -> None:
    before, after = _threads_before_and_after("own")
    assert after == before


def test_control_the_same_work_on_the_main_thread_leaves_its_workers() -> None:
    before, after = _threads_before_and_after("main")
    assert after > before


def test_the_result_and_the_exception_reach_the_caller_from_another_thread() -> None:
    caller = threading.get_ident()
    assert in_a_thread_of_its_own(lambda: threading.get_ident()) != caller

    def fail() -> None:
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        in_a_thread_of_its_own(fail)
