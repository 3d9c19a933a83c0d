"""Stop one thread of another process while the rest of it runs on: how a test makes a model stuck in its
forward (a deadlock, a hung kernel) on a real Triton, whose server and model stub keep answering.

SIGSTOP cannot do this: it stops every thread of a process, and Triton reports a stopped stub "not healthy"
at once. ``ptrace`` stops a single thread (``PTRACE_SEIZE`` then ``PTRACE_INTERRUPT``) and ``PTRACE_DETACH``
lets it go on where it was. The kernel ties a tracee to the *thread* that seized it: call `stop` and
`resume` from the same thread (the test's own). Should a test die in between, the kernel detaches its
tracees when it exits.
"""

from __future__ import annotations

import ctypes
import os

_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000  # waitpid: any child, thread or tracee


class ThreadStopper:
    """Stops the thread ``tid`` (of any process this user may trace) on `stop`, resumes it on `resume`."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.stopped = False
        self._ptrace = ctypes.CDLL(None, use_errno=True).ptrace
        self._ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self._ptrace.restype = ctypes.c_long

    def _call(self, request: int, what: str) -> None:
        if self._ptrace(request, self.tid, None, None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"ptrace {what} of thread {self.tid}: {os.strerror(errno)}")

    def stop(self) -> None:
        """Stop the thread; returns once it is stopped."""
        self._call(_PTRACE_SEIZE, "seize")
        self._call(_PTRACE_INTERRUPT, "interrupt")
        os.waitpid(self.tid, _WALL)
        self.stopped = True

    def resume(self) -> None:
        """Let the thread go on (nothing if it was not stopped)."""
        if self.stopped:
            self._call(_PTRACE_DETACH, "detach")
            self.stopped = False
