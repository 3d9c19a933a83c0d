"""A test-only userspace TCP proxy that injects network faults between the orchestrator and one service.

Why it exists: ``tc netem`` needs privileges this machine does not give, and the faults that matter for a
fleet are about connections, not packets: a slow link, a connection that is reset mid-stream, and a
peer that accepts and then never answers. `FaultProxy` listens on 127.0.0.1 (only), forwards every
connection to one upstream address on 127.0.0.1, and can, while running:

* ``set_latency(s)``: deliver every chunk, in each direction, ``s`` seconds after it was read (order and
  throughput kept: the delay is not serialised);
* ``reset()``: abort every open connection with a TCP RST on both sides (SO_LINGER 0);
* ``set_blackhole(True)``: stop forwarding on every open connection (bytes read stay queued, nothing is
  written; TCP backpressure does the rest) and accept new connections without ever answering them;
  ``set_blackhole(False)`` delivers what was held back, connects the held new connections upstream, and
  forwards normally again.

It runs its own event loop on a thread, so synchronous tests (and tests with their own ``asyncio.run``)
can drive it; every control call waits until the proxy applied it. ``stop`` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"
_CHUNK = 64 * 1024


class _Link:
    """One proxied connection: two sockets and the two pumps between them."""

    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.client = client
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.tasks: list[asyncio.Task] = []

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client[1]] + ([self.upstream[1]] if self.upstream else [])


class FaultProxy:
    """``with FaultProxy("127.0.0.1:8001") as proxy: ...`` -> connect to ``proxy.address`` instead."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        if host != _LOOPBACK:
            raise ValueError(f"the fault proxy only forwards to {_LOOPBACK}, not {upstream!r}")
        self.upstream = (host, int(port))
        self.address = ""
        self.accepted = 0  # connections accepted so far
        self._latency_s = 0.0
        self._flowing: asyncio.Event | None = None  # cleared while black-holed
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task] = set()  # one per accepted connection
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    # --- control (from any thread) ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        log.info("fault proxy %s -> %s:%d", self.address, *self.upstream)
        return self

    def set_latency(self, seconds: float) -> None:
        async def apply() -> None:
            self._latency_s = seconds

        self._call(apply())

    def reset(self) -> int:
        """Reset every open connection (RST both ways); returns how many were reset."""

        async def apply() -> int:
            links = list(self._links)
            for link in links:
                self._abort(link)
            return len(links)

        return self._call(apply())

    def set_blackhole(self, on: bool) -> None:
        async def apply() -> None:
            assert self._flowing is not None
            if on:
                self._flowing.clear()
            else:
                self._flowing.set()

        self._call(apply())

    def open_connections(self) -> int:
        async def count() -> int:
            return len(self._links)

        return self._call(count())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                self._abort(link)
            for handler in self._handlers:
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    # --- the proxy (on its own loop) ---------------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, _LOOPBACK, 0)
        self.address = f"{_LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link((reader, writer))
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            assert self._flowing is not None
            await self._flowing.wait()  # black-holed: accepted, never answered (until the hole closes)
            try:
                link.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._abort(link)  # the service is down: so is the proxied connection
                return
            link.tasks = [
                asyncio.ensure_future(self._pump(link.client[0], link.upstream[1])),
                asyncio.ensure_future(self._pump(link.upstream[0], link.client[1])),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            self._abort(link)
        except asyncio.CancelledError:  # stop(): asyncio's stream callback must not see a cancelled handler
            self._abort(link)
        finally:
            self._links.discard(link)
            self._handlers.discard(handler)
            for task in link.tasks:
                task.cancel()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction: each chunk is written ``latency`` after it was read, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            assert self._flowing is not None
            while True:
                due, data = await queue.get()
                if not data:
                    return
                await self._flowing.wait()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(_CHUNK):
                queue.put_nowait((time.monotonic() + self._latency_s, data))
                if delivering.done():
                    break
            queue.put_nowait((0.0, b""))
            await delivering
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            delivering.cancel()

    def _abort(self, link: _Link) -> None:
        for writer in link.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in link.tasks:
            task.cancel()
