"""The fault proxy itself (tests/faultproxy.py), against an echo server on 127.0.0.1: it forwards, delays,
resets and black-holes as the fault tests assume."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"127.0.0.1:{server.server_address[1]}") as running:
            yield running
    finally:
        server.shutdown()
        server.server_close()


def connect(proxy: FaultProxy) -> socket.socket:
    host, _, port = proxy.address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5)


def round_trip(sock: socket.socket, data: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(data)
    assert sock.recv(4096) == data
    return time.monotonic() - started


def test_it_forwards_and_adds_latency_both_ways(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        round_trip(sock)
        proxy.set_latency(0.2)
        assert round_trip(sock) >= 0.4  # 0.2 s each way
        proxy.set_latency(0.0)


def test_reset_aborts_open_connections_with_an_rst(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        round_trip(sock)
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(10)
    with connect(proxy) as sock:  # new connections work again
        round_trip(sock)


def test_a_black_hole_accepts_and_never_answers_until_it_is_lifted(proxy: FaultProxy) -> None:
    with connect(proxy) as held:
        round_trip(held)
        proxy.set_blackhole(True)
        with connect(proxy) as fresh:  # accepted...
            for sock in (held, fresh):
                sock.settimeout(0.5)
                sock.sendall(b"anyone?")
                with pytest.raises(TimeoutError):  # ...but never answered
                    sock.recv(10)
            proxy.set_blackhole(False)
            for sock in (held, fresh):  # what was held back is delivered
                sock.settimeout(5)
                assert sock.recv(10) == b"anyone?"


def test_it_refuses_to_forward_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="only forwards to 127.0.0.1"):
        FaultProxy("10.0.0.1:80")
