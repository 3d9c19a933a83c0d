"""Bootstrap of the draft gRPC server: load the model, bind, start; serving and stopping are the caller's.

Why it exists: tests and ``python -m draft_service`` need the same server, built the same way, but only the
latter blocks on signals. ``create_server`` returns a started server bound to ``host:port`` (port 0 picks
a free port, which it returns) with health (SERVING) and method-aware reflection, the idle-TTL evictor
and, when ``metrics_port`` > 0, the Prometheus endpoint. ``DraftServer.stop`` undoes all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health

from draft_service.config import DraftConfig
from draft_service.drafter import Drafter
from draft_service.metrics import DraftMetrics
from draft_service.servicer import DraftServicer
from specdec.engine import CausalLMEngine, SequenceStore
from specdec.grpc_server import add_health_and_reflection, set_serving
from specdec.models import load_model, parse_layers
from specdec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME: str = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name  # specdec.v1.DraftService


def build_drafter(config: DraftConfig) -> Drafter:
    """Load the draft model named by ``config`` (blocking: ~0.2 s, or ~20 s on the first SmolLM2 use)."""
    keep = parse_layers(config.keep_layers)
    layers = config.keep_layers or "all"
    log.info("loading draft model %r (layers %s, %s, %s)", config.model, layers, config.device, config.dtype)
    start = time.perf_counter()
    model = load_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        keep_layers=keep,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
    )
    log.info(
        "draft model loaded in %.1f s: %d layers, vocab %d",
        time.perf_counter() - start, model.config.num_hidden_layers, model.config.vocab_size,
    )
    store = SequenceStore(config.max_sequences, config.idle_ttl_s)
    return Drafter(CausalLMEngine(model, store), config.max_num_draft_tokens)


@dataclass
class DraftServer:
    """A running draft server and what it owns besides the grpc.aio.Server."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    drafter: Drafter
    metrics: DraftMetrics
    metrics_port: int | None  # None when metrics are off
    executor: ThreadPoolExecutor
    _evictor: asyncio.Task | None = field(default=None, repr=False)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, stop the server (open streams get ``grace`` seconds), then ``close``."""
        await set_serving(self.health, [SERVICE_NAME], False)
        await self.server.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Stop the evictor, the metrics endpoint and the model worker (after the gRPC server stopped)."""
        if self._evictor is not None:
            self._evictor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._evictor
            self._evictor = None
        self.metrics.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def create_server(
    config: DraftConfig, drafter: Drafter | None = None
) -> tuple[grpc.aio.Server, int, DraftServer]:
    """Build, bind and start the draft server; returns (server, bound port, handle).

    ``drafter`` replaces loading the model named by ``config`` (tests). Stop with ``handle.stop(grace)``,
    or hand ``server`` and ``handle.health`` to ``specdec.grpc_server.serve_until_signal`` with
    ``on_stop=handle.close``.
    """
    if drafter is None:
        drafter = await asyncio.to_thread(build_drafter, config)
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="draft-model", initializer=_init_model_worker, initargs=(config.threads,)
    )
    metrics = DraftMetrics(lambda: drafter.stats().live_sequences, drafter.stats().max_sequences)
    # SO_REUSEPORT off: a second server on a taken port must fail, not silently share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    draft_pb2_grpc.add_DraftServiceServicer_to_server(DraftServicer(drafter, executor, metrics), server)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        port = server.add_insecure_port(f"{host}:{config.port}")
    except RuntimeError as exc:
        executor.shutdown(wait=False)
        raise OSError(f"cannot bind {host}:{config.port}: {exc}") from exc
    if port == 0:
        executor.shutdown(wait=False)
        raise OSError(f"cannot bind {host}:{config.port}")
    handle = DraftServer(server, port, health_servicer, drafter, metrics, None, executor)
    try:
        await asyncio.get_running_loop().run_in_executor(executor, lambda: None)  # start the worker now
        await server.start()
        if config.metrics_port > 0:
            handle.metrics_port = metrics.serve(config.host, config.metrics_port)
        interval = min(30.0, config.idle_ttl_s / 2)
        handle._evictor = asyncio.create_task(_evict_periodically(drafter, interval), name="draft-evictor")
        await set_serving(health_servicer, [SERVICE_NAME], True)
    except BaseException:
        await handle.stop(0)
        raise
    log.info("draft service listening on %s:%d", config.host, port)
    return server, port, handle


def _init_model_worker(threads: int) -> None:
    # torch's OpenMP thread count is per calling thread: set it in the thread that runs the model.
    if threads > 0:
        torch.set_num_threads(threads)
    log.info("model worker started: %d torch threads", torch.get_num_threads())


async def _evict_periodically(drafter: Drafter, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            drafter.evict_idle()
        except Exception:  # noqa: BLE001 - keep evicting whatever happened once
            log.exception("idle eviction failed")
