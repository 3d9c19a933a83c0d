"""Child processes, free ports and readiness: the one helper the Triton launcher, the local stack and the
tests use to start our servers and to know when they serve.

Why it exists: every server is started from our own entry points as a child process on 127.0.0.1 and
free ports, waited for until it answers, and stopped however the caller exits, even killed outright
(`popen_tied_to_this_process`). `Process` owns one child
(its log file, SIGTERM then SIGKILL to its process group), `wait_ready` polls a readiness check while
failing fast if the child died, and the /proc helpers find the processes a child left behind, and the
threads a process named (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.hostport import address_family, bare_host

log = logging.getLogger(__name__)

_PR_SET_NAME = 15  # prctl's option that names the calling thread (<linux/prctl.h>)
_PR_SET_PDEATHSIG = 1  # and the one that asks for a signal when the parent (thread) dies


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's choice for a bind to port 0)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports nothing listens on now.

    Every socket stays bound until all are picked: the OS may hand a just-released port out again, so
    picking one at a time can give one server the same port twice (Triton then refuses to start).
    """
    with contextlib.ExitStack() as stack:
        family = address_family(host)
        socks = [stack.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((bare_host(host), 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child sent SIGTERM when the thread that forked it ends (Linux
    ``PR_SET_PDEATHSIG``). Use `popen_tied_to_this_process`, whose forking thread lives as long as the process."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the setting took: no one would stop this child
            os._exit(1)

    return in_child


_Job = tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]  # (the answer, argv, Popen's kwargs)


class _Spawner:
    """The one thread that forks every child of this process (started on first use, ended with the process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] | None = None
        os.register_at_fork(after_in_child=self._forget)  # a forked copy of us has no spawner thread

    def popen(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._jobs,), name="specdec-spawner", daemon=True).start()
            jobs = self._jobs
        done: Future[subprocess.Popen[bytes]] = Future()
        jobs.put((done, argv, kwargs))
        return done.result()

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._jobs = None

    @staticmethod
    def _run(jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            done, argv, kwargs = jobs.get()
            try:
                child = subprocess.Popen(argv, preexec_fn=die_with(os.getpid()), **kwargs)  # noqa: S603, PLW1509
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)
            else:
                done.set_result(child)


_SPAWNER = _Spawner()


def popen_tied_to_this_process(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)`` for a child sent SIGTERM when this process ends, however it ends.

    Why: our children run in sessions of their own (so a Ctrl-C reaches us, and we stop them in order), so
    nothing else stops them when we die without stopping them: a SIGKILL, an OOM kill, or the SIGHUP of a
    closed terminal would leave a Triton, a draft service or an orchestrator running, holding its ports (the
    next ``make serve`` then cannot bind 50051), its memory and its GPU. The kernel's parent-death signal
    fires when the *thread* that forked the child ends, not the process, so a child started from a thread
    that then returns (a restart run on a worker thread) would be stopped at once: every child is therefore
    forked by one daemon thread that lives as long as the process."""
    return _SPAWNER.popen(argv, kwargs)


class Process:
    """A child process in a session of its own, its output in a log file; stopped with SIGTERM, then SIGKILL,
    and sent SIGTERM by the kernel if this process ends first (`popen_tied_to_this_process`)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        log.debug("starting %s: %s", name, " ".join(argv))
        self.popen = popen_tied_to_this_process(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}; its log ends with:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, timeout_s: float = 30.0) -> None:
        """SIGKILL the process and its process group, and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout_s)

    def stop(self, grace_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()


def wait_ready(
    ready: Callable[[], bool],
    what: str,
    timeout_s: float,
    alive: Callable[[], None] = lambda: None,
    tail: Callable[[], str] = lambda: "",
    interval_s: float = 0.2,
) -> None:
    """Poll ``ready()`` (exceptions count as not ready) until it is true; ``alive()`` raises if the process
    died. TimeoutError after ``timeout_s``, with ``tail()`` (the process's last log lines)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        with contextlib.suppress(Exception):
            if ready():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{tail()}")
        time.sleep(interval_s)


def wait_grpc_healthy(address: str, process: Process, timeout_s: float) -> None:
    """Until the server at ``address`` answers grpc.health.v1 SERVING for "" (failing fast if it died)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
            return status == health_pb2.HealthCheckResponse.SERVING

        wait_ready(serving, process.name, timeout_s, process.check_alive, process.tail)


def wait_triton_ready(http_url: str, model: str, timeout_s: float, alive: Callable[[], None] = lambda: None,
                      tail: Callable[[], str] = lambda: "") -> None:
    """Until Triton at ``http_url`` (its KServe HTTP host:port) is ready and serves ``model``.

    HTTP, the same endpoints Kubernetes probes: it answers whether Triton's gRPC port is plaintext or (mutual) TLS."""

    def ready() -> bool:
        for path in ("/v2/health/ready", f"/v2/models/{model}/ready"):
            with urllib.request.urlopen(f"http://{http_url}{path}", timeout=1.0) as response:  # noqa: S310 - ours
                if response.status != 200:
                    return False
        return True

    wait_ready(ready, f"Triton ({model})", timeout_s, alive, tail, interval_s=0.1)


def _proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, command name, parent pid, process group) of every process (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            after = text.rsplit(")", 1)[1].split()  # fields after the name: state, ppid, pgrp, ...
            found.append((int(stat.parent.name), comm, int(after[1]), int(after[2])))
    return found


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def pids_named(name: str) -> list[int]:
    """Pids of every process in sight whose command name is ``name``."""
    return [pid for pid, comm, _, _ in _proc_stats() if comm == name]


def children_named(parent: int, name: str) -> list[int]:
    """Pids of the direct children of ``parent`` whose command name is ``name``."""
    return [pid for pid, comm, ppid, _ in _proc_stats() if ppid == parent and comm == name]


def kill_group(pgid: int) -> None:
    """SIGKILL the processes still in process group ``pgid`` (a child that ran as a session leader)."""
    for pid, _, _, group in _proc_stats():
        if group == pgid:
            log.warning("killing process %d left behind in process group %d", pid, pgid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def name_this_thread(name: str) -> None:
    """Give the calling thread an OS-level name (at most 15 bytes: ``/proc/<pid>/task/<tid>/comm``, ``top -H``,
    ``py-spy dump``; Python's own thread names stay inside Python), so that an operator looking at a busy or
    stuck process, and a test, can tell its threads apart. Threads it starts later inherit the name (its OpenMP
    workers, say: all of them do its work). Does nothing where prctl is missing."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15])


def threads_named(pid: int, name: str) -> list[int]:
    """Thread ids of the threads of process ``pid`` whose OS-level name is ``name`` (`name_this_thread`)."""
    found = []
    for comm in Path(f"/proc/{pid}/task").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().rstrip("\n") == name:
                found.append(int(comm.parent.name))
    return sorted(found)
