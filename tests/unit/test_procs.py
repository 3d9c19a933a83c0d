"""Free ports for our servers: several picked together are all different, and none is one already asked for.

Why: the OS may hand a port it just released out again, and a Triton given the same port for two of its
listeners refuses to start (a CI run failed so: "cannot listen to GRPC requests and metrics requests at the
same address and port"). On an IPv6 host too: the ports are picked there, every URL puts the host in
brackets, and Triton's listeners are given it in the forms they parse. A child ends with its parent, even one
killed outright, and outlives the thread that started it. And processes found by their command name (the
Triton stubs a liveness probe asks for their stacks), threads by the OS-level name they gave themselves (the
model's forward thread).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specdec.hostport import address_family, join_host_port
from specdec.procs import ended, free_ports, name_this_thread, pids_named, popen_tied_to_this_process, threads_named
from target_service.config import TritonServerConfig
from target_service.launcher import TritonServer, triton_bind_addresses


def test_ports_picked_together_are_all_different_and_free():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # nothing holds it once picked


def test_triton_never_gets_one_port_for_two_listeners():
    for _ in range(20):
        server = TritonServer(TritonServerConfig(grpc_port=0, http_port=0, metrics_port=0))
        assert len({server.grpc_port, server.http_port, server.metrics_port}) == 3


def test_triton_free_ports_avoid_the_ones_asked_for():
    asked = free_ports(1)[0]
    server = TritonServer(TritonServerConfig(grpc_port=asked, http_port=0, metrics_port=0))
    assert server.grpc_port == asked
    assert asked not in (server.http_port, server.metrics_port)
    assert server.http_port != server.metrics_port


@pytest.mark.parametrize(("host", "joined", "family"), [
    ("127.0.0.1", "127.0.0.1:80", socket.AF_INET),
    ("localhost", "localhost:80", socket.AF_INET),
    ("::1", "[::1]:80", socket.AF_INET6),
    ("[::1]", "[::1]:80", socket.AF_INET6),
    ("::", "[::]:80", socket.AF_INET6),
])  # fmt: skip
def test_a_host_and_a_port_join_with_ipv6_in_brackets_and_bind_with_its_family(host, joined, family):
    assert join_host_port(host, 80) == joined
    assert address_family(host) == family


def test_a_host_that_does_not_resolve_is_an_os_error():
    with pytest.raises(OSError, match="cannot resolve host 'no-such-host.invalid'"):
        address_family("no-such-host.invalid")


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ports_are_picked_on_an_ipv6_host(host):
    ports = free_ports(4, host)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", port))


def test_triton_on_an_ipv6_host_gets_it_in_the_forms_its_listeners_parse_and_gives_bracketed_urls():
    assert triton_bind_addresses("127.0.0.1") == ("127.0.0.1", "127.0.0.1")
    assert triton_bind_addresses("::1") == triton_bind_addresses("[::1]") == ("[::1]", "ipv6:::1")
    server = TritonServer(TritonServerConfig(host="::1", grpc_port=8001, http_port=8000, metrics_port=8002))
    assert (server.grpc_url, server.http_url, server.metrics_url) == ("[::1]:8001", "[::1]:8000",
                                                                      "http://[::1]:8002/metrics")
    command = server.command(Path("/triton"), Path("/models"))
    assert {"--grpc-address=[::1]", "--http-address=ipv6:::1", "--metrics-address=ipv6:::1"} <= set(command)


def test_a_child_started_from_a_thread_that_ends_lives_on():
    # The kernel's parent-death signal follows the thread that forked the child: one forked by a thread that
    # then returns (a restart done on a worker thread) would be stopped with it, were it not forked by ours.
    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(popen_tied_to_this_process(["sleep", "30"])))
    thread.start()
    thread.join()
    (child,) = started
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(1.0)
    finally:
        child.kill()
        child.wait()


def test_a_child_is_stopped_when_its_parent_is_killed_outright(tmp_path):
    # A parent that cannot stop its children (SIGKILL, an OOM kill, a closed terminal's SIGHUP): they run in
    # sessions of their own, so only the kernel's parent-death signal can stop them.
    script = (
        "import subprocess, sys, time\n"
        "from specdec.procs import Process\n"
        f"child = Process('sleeper', ['sleep', '60'], __import__('pathlib').Path({str(tmp_path / 'c.log')!r}), {{}})\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,  # noqa: S603
                              cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    child = int(parent.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while not ended(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended(child), "the child outlived its parent"



def test_processes_are_found_by_their_command_name():
    me = Path("/proc/self/comm").read_text().strip()
    assert os.getpid() in pids_named(me)
    assert pids_named("no-such-program") == []


def test_a_thread_that_named_itself_is_found_by_that_name_and_the_name_is_cut_to_15_bytes():
    named, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        name_this_thread("specdec-test-thread")  # 19 bytes: the kernel keeps 15
        named.set()
        done.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert named.wait(10)
        assert threads_named(os.getpid(), "specdec-test-th") == tid
        assert threads_named(os.getpid(), "specdec-test-thread") == []
        assert threading.get_native_id() not in threads_named(os.getpid(), "specdec-test-th")
    finally:
        done.set()
        thread.join()
