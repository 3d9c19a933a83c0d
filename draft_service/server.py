"""Bootstrap of the draft gRPC server: assemble the drafters, bind, start; serving and stopping are the caller's.

Why it exists: tests and ``python -m draft_service`` need the same server, built the same way, but only the
latter blocks on signals. ``create_server`` returns a started server bound to ``host:port`` (port 0 picks a
free port) with health (SERVING; NOT_SERVING while the model's forwards are stuck: the watchdog) and
method-aware reflection, the idle-TTL evictor and, when ``metrics_port`` > 0, the Prometheus endpoint.
``DraftServer.stop`` undoes all of it.

Why grpcio's blocking server and not grpc.aio (which the orchestrator uses): a draft round sits between
two messages on the critical path of every speculative round. With aio the request hops from grpc's poller
to the event loop, to a worker and back; here the thread that reads the request runs the round (a
model-free drafter in place; a model drafter's forwards on the shared step loop) and writes the reply, a
shorter hop (bench/README.md, "Design measurements"). The cost is a thread per open stream, so the pool
has ``max_sequences`` threads for streams plus ``SPARE_THREADS`` that the servicer keeps free for health
checks, GetStats, Release and reflection.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health

from draft_service.build import build_core
from draft_service.config import DraftConfig
from draft_service.core import DraftCore
from draft_service.drafters.steps import StepLoop
from draft_service.metrics import DraftMetrics
from draft_service.servicer import DraftServicer
from draft_service.watchdog import StepWatchdog
from specdec.grpc_server import EXCLUSIVE_PORT, add_health_and_reflection, set_serving_blocking
from specdec.hostport import join_host_port
from specdec.tls import add_port, server_credentials
from specdec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME: str = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name  # specdec.v1.DraftService
SPARE_THREADS = 4  # server threads beyond one per stream: health, GetStats, Release, reflection


@dataclass
class DraftServer:
    """A running draft server and what it owns besides the grpc.Server."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    core: DraftCore
    metrics: DraftMetrics
    metrics_port: int | None  # None when metrics are off
    threads: ThreadPoolExecutor
    steps: StepLoop | None  # the model drafter's step loop; None when no model is loaded
    watchdog: StepWatchdog | None = None  # reports NOT_SERVING while the step loop is stuck
    _stop_evicting: threading.Event = field(default_factory=threading.Event, repr=False)
    _evictor: threading.Thread | None = field(default=None, repr=False)

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop; when this returns every handler has finished and released its cache.

        Reports NOT_SERVING, stops the server (open streams get ``grace`` seconds, then are cancelled),
        waits for the handler threads (grpc's shutdown event does not), then stops the model's step loop,
        the evictor and the metrics endpoint.
        """
        if self.watchdog is not None:
            self.watchdog.stop()  # it must not report SERVING again
        set_serving_blocking(self.health, [SERVICE_NAME], False)
        self.server.stop(grace).wait()
        self.threads.shutdown(wait=True, cancel_futures=True)
        if self.steps is not None:
            self.steps.stop()
        self._stop_evicting.set()
        if self._evictor is not None:
            self._evictor.join()
            self._evictor = None
        self.metrics.stop()

    def start_evicting(self, interval_s: float) -> None:
        self._evictor = threading.Thread(
            target=_evict_periodically, args=(self.core, interval_s, self._stop_evicting),
            name="draft-evictor", daemon=True,
        )
        self._evictor.start()


def create_server(
    config: DraftConfig, model: torch.nn.Module | None = None, core: tuple[DraftCore, StepLoop | None] | None = None
) -> DraftServer:
    """Build, bind and start the draft server; stop it with ``DraftServer.stop(grace)``.

    ``model`` replaces loading the model named by ``config``, ``core`` the whole assembly (tests). Loading
    blocks: ~0.2 s, or ~20 s on the first SmolLM2 use; a server offering only model-free drafters loads none.
    """
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)  # bad files fail first
    metrics: DraftMetrics | None = None
    if core is None:
        core = build_core(config, model, on_forward=lambda n: metrics.observe_forward(n) if metrics else None)
    draft_core, steps = core
    threads = ThreadPoolExecutor(
        max_workers=config.max_sequences + SPARE_THREADS, thread_name_prefix="draft-rpc",
        initializer=_init_server_thread, initargs=(config.threads,),
    )
    try:  # a taken port, or a stop signal (`specdec.startup.StopSignals`), stops the step loop and the threads
        stalled_s = steps.stalled_s if steps is not None else lambda: 0.0
        metrics = DraftMetrics(draft_core.stats, config.max_sequences, stalled_s)
        server = grpc.server(threads, options=[EXCLUSIVE_PORT])
        servicer = DraftServicer(draft_core, metrics, config.max_sequences)
        draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server)
        health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
        port = add_port(server, config.host, config.port, credentials)
    except BaseException:
        _abandon(threads, steps)
        raise
    handle = DraftServer(server, port, health_servicer, draft_core, metrics, None, threads, steps)
    try:
        server.start()
        if config.metrics_port > 0:
            handle.metrics_port = metrics.serve(config.host, config.metrics_port)
        handle.start_evicting(min(30.0, config.idle_ttl_s / 2))
        set_serving_blocking(health_servicer, [SERVICE_NAME], True)
        if steps is not None and config.stall_timeout_s > 0:
            handle.watchdog = StepWatchdog(
                steps.stalled_s, config.stall_timeout_s,
                lambda serving: set_serving_blocking(health_servicer, [SERVICE_NAME], serving),
            )
            handle.watchdog.start(min(1.0, config.stall_timeout_s / 4))
    except BaseException:
        handle.stop(0)
        raise
    tls = "plaintext" if credentials is None else "mutual TLS" if config.tls_client_ca else "TLS"
    log.info("draft service listening on %s (%s)", join_host_port(config.host, port), tls)
    return handle


def _init_server_thread(threads: int) -> None:
    # torch's OpenMP thread count is per calling thread: set it in every thread that may run the model.
    if threads > 0:
        torch.set_num_threads(threads)


def _abandon(threads: ThreadPoolExecutor, steps: StepLoop | None) -> None:
    threads.shutdown(wait=False)
    if steps is not None:
        steps.stop()


def _evict_periodically(core: DraftCore, interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            core.evict_idle()
        except Exception:  # noqa: BLE001 - keep evicting whatever happened once
            log.exception("idle eviction failed")
