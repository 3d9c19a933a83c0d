"""gRPC server plumbing every specdec server shares: health, reflection, the error boundary, serving.

It serves both kinds of grpcio server: the orchestrator's ``grpc.aio`` server and the draft service's
thread-per-stream ``grpc.server`` (see ``draft_service.server`` for why the draft uses threads).

- Health (grpc.health.v1) reports SERVING for "" and each service once the server is up, and NOT_SERVING
  while it drains, so load balancers and `grpc_health_probe` see the truth.
- Reflection answers method symbols too (``specdec.v1.GenerationService.Generate``): grpcio-reflection
  only resolves services and messages, and ghz asks for the method, so we fall back to the file of the
  method's service.
- ``error_boundary`` turns exceptions into one precise status per exception type, from a table each server
  owns; anything unexpected becomes INTERNAL with the traceback in the log and only a reference on the wire.
  It also reports every call's final status to the servicer (``observe_rpc``): the one RPC-counting path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as _AsyncReflectionServicer

from specdec.logs import log_prefix

log = logging.getLogger(__name__)

ErrorTable = Sequence[tuple[type[BaseException], grpc.StatusCode]]

# A server option for every specdec server: grpc sets SO_REUSEPORT by default on Linux, so a second server
# on a taken port starts and silently shares it (an old process still draining, two stacks on one host);
# off, the second one fails to bind (`specdec.tls.add_port`).
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


class _MethodSymbols:
    """Mixed into a grpcio-reflection servicer: also resolve fully-qualified method names to their file."""

    _pool: Any

    def _file_containing_symbol(self, request, fully_qualified_name):  # noqa: ANN001 - base signature
        try:
            self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            service_name, _, method = fully_qualified_name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is not None and method in service.methods_by_name:
                return super()._file_containing_symbol(request, service_name)
        return super()._file_containing_symbol(request, fully_qualified_name)  # type: ignore[misc]


class MethodSymbolReflectionServicer(_MethodSymbols, reflection.ReflectionServicer):
    """Reflection for a ``grpc.server`` that also answers method symbols."""


class AsyncMethodSymbolReflectionServicer(_MethodSymbols, _AsyncReflectionServicer):
    """Reflection for a ``grpc.aio.server`` that also answers method symbols."""


def add_health_and_reflection(
    server: grpc.Server | grpc.aio.Server, service_names: Iterable[str]
) -> health.HealthServicer | health.aio.HealthServicer:
    """Register health and reflection for ``service_names``; returns the health servicer to flip.

    The servicers match the server's kind: ``health.aio.HealthServicer`` for a ``grpc.aio.Server``, else
    the thread-safe ``health.HealthServicer`` (whose Watch holds no thread).
    """
    asynchronous = isinstance(server, grpc.aio.Server)
    health_servicer = health.aio.HealthServicer() if asynchronous else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    servicer = AsyncMethodSymbolReflectionServicer(names) if asynchronous else MethodSymbolReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    return health_servicer


def _health_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    """SERVING or NOT_SERVING for "" and each of ``service_names`` (aio health servicer)."""
    for name in ["", *service_names]:
        await health_servicer.set(name, _health_status(serving))


def set_serving_blocking(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    """``set_serving`` for the thread-safe health servicer of a ``grpc.server``."""
    for name in ["", *service_names]:
        health_servicer.set(name, _health_status(serving))


class ObservesRpcs(Protocol):
    """A servicer whose RPCs `error_boundary` reports, each once, with the status the caller got."""

    def observe_rpc(self, method: str, code: grpc.StatusCode) -> None: ...


def _gone(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose caller left: DEADLINE_EXCEEDED if its deadline passed, else CANCELLED."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def error_boundary(table: ErrorTable, logger: logging.Logger) -> Callable:
    """Decorate a servicer method with one exception -> status map, and count the call.

    Works on all four shapes grpcio calls: aio unary and aio server-streaming (async generator) methods,
    and the blocking server's unary and streaming (generator) methods. The first matching row of ``table``
    wins and its message goes on the wire; grpc aborts and cancellation pass through; anything else is
    INTERNAL, logged with its traceback and a reference id. Every call ends with one
    ``self.observe_rpc(method_name, status)`` when the servicer has that method (`ObservesRpcs`): the one
    place RPCs are counted, whatever server kind or outcome.
    """

    def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
        prefix = log_prefix(exc)  # "sequence_id=<id> " when the error ended a known sequence
        for exc_type, code in table:
            if isinstance(exc, exc_type):
                logger.info("%s%s: %s", prefix, code.name, exc)
                return code, str(exc)
        ref = uuid.uuid4().hex[:12]
        logger.exception("%sinternal error (ref %s)", prefix, ref)
        return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log"

    def observe(servicer: object, method: str, code: grpc.StatusCode) -> None:
        observe_rpc = getattr(servicer, "observe_rpc", None)
        if observe_rpc is not None:
            observe_rpc(method, code)

    @contextlib.asynccontextmanager
    async def aio_boundary(servicer: object, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        code = grpc.StatusCode.OK
        try:
            yield
        except grpc.aio.AbortError:  # the method aborted the call itself
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller left, or gRPC's deadline
            code = _gone(context)
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            code, message = status_of(exc)
            await context.abort(code, message)
        finally:
            observe(servicer, method, code)

    @contextlib.contextmanager
    def blocking_boundary(servicer: object, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        code = grpc.StatusCode.OK
        try:
            yield
        except (grpc.RpcError, GeneratorExit):  # the client cancelled or the deadline passed: nobody to tell
            code = _gone(context)
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            code, message = status_of(exc)
            context.abort(code, message)  # raises: grpc sends the status set here
        finally:
            observe(servicer, method, code)

    def decorate(method: Callable) -> Callable:
        name = method.__name__
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def async_stream_wrapper(self, request, context):  # noqa: ANN001
                async with aio_boundary(self, name, context):
                    async for item in method(self, request, context):
                        yield item

            return async_stream_wrapper

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def async_unary_wrapper(self, request, context):  # noqa: ANN001
                async with aio_boundary(self, name, context):
                    return await method(self, request, context)

            return async_unary_wrapper

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def stream_wrapper(self, request, context):  # noqa: ANN001
                with blocking_boundary(self, name, context):
                    yield from method(self, request, context)

            return stream_wrapper

        @functools.wraps(method)
        def unary_wrapper(self, request, context):  # noqa: ANN001
            with blocking_boundary(self, name, context):
                return method(self, request, context)

        return unary_wrapper

    return decorate


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: Iterable[str],
    grace_s: float,
    asked_before: threading.Event | None = None,
) -> None:
    """Run a started server until SIGINT/SIGTERM, then drain: NOT_SERVING, stop with a grace period.

    ``asked_before``: set by a signal that came before this installed the event loop's handlers
    (`specdec.startup.StopSignals.stop`); it stops the server at once instead of being lost."""
    names = list(service_names)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if asked_before is not None and asked_before.is_set():
        stop.set()
    await stop.wait()
    log.info("stopping: draining for up to %.1f s", grace_s)
    await set_serving(health_servicer, names, False)
    await server.stop(grace_s)
