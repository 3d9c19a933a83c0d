"""gRPC server plumbing every specdec server shares: health, reflection, the error boundary, serving.

- Health (grpc.health.v1) reports SERVING for "" and each service once the server is up, and NOT_SERVING
  while it drains, so load balancers and `grpc_health_probe` see the truth.
- Reflection answers method symbols too (``specdec.v1.GenerationService.Generate``): grpcio-reflection
  only resolves services and messages, and ghz asks for the method, so we fall back to the file of the
  method's service.
- ``error_boundary`` turns exceptions into one precise status per exception type, from a table each server
  owns; anything unexpected becomes INTERNAL with the traceback in the log and only a reference on the wire.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import uuid
from collections.abc import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as _AsyncReflectionServicer

from specdec.logs import log_prefix

log = logging.getLogger(__name__)

ErrorTable = Sequence[tuple[type[BaseException], grpc.StatusCode]]


class MethodSymbolReflectionServicer(_AsyncReflectionServicer):
    """Server reflection that also resolves fully-qualified method names to their service's file."""

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
        return super()._file_containing_symbol(request, fully_qualified_name)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Register health and reflection for ``service_names``; returns the health servicer to flip."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    all_names = [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(MethodSymbolReflectionServicer(all_names), server)
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def error_boundary(table: ErrorTable, logger: logging.Logger) -> Callable:
    """Decorate an aio servicer method (unary or server-streaming) with one exception -> status map.

    The first matching row of ``table`` wins and its message goes on the wire; grpc aborts and
    cancellation pass through; anything else is INTERNAL, logged with its traceback and a reference id.
    """

    async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        prefix = log_prefix(exc)  # "sequence_id=<id> " when the error ended a known sequence
        for exc_type, code in table:
            if isinstance(exc, exc_type):
                logger.info("%s%s: %s", prefix, code.name, exc)
                await context.abort(code, str(exc))
        ref = uuid.uuid4().hex[:12]
        logger.exception("%sinternal error (ref %s)", prefix, ref)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log")

    def decorate(method: Callable) -> Callable:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def stream_wrapper(self, request, context):  # noqa: ANN001
                try:
                    async for item in method(self, request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the boundary
                    await _abort(context, exc)

            return stream_wrapper

        @functools.wraps(method)
        async def unary_wrapper(self, request, context):  # noqa: ANN001
            try:
                return await method(self, request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - this is the boundary
                await _abort(context, exc)

        return unary_wrapper

    return decorate


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: Iterable[str],
    grace_s: float,
    on_stop: Callable[[], object] | None = None,
) -> None:
    """Run a started server until SIGINT/SIGTERM, then drain: NOT_SERVING, stop with a grace period."""
    names = list(service_names)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining for up to %.1f s", grace_s)
    await set_serving(health_servicer, names, False)
    await server.stop(grace_s)
    if on_stop is not None:
        result = on_stop()
        if inspect.isawaitable(result):
            await result
