"""Bootstrap of the orchestrator: ``create_server(config) -> (server, port)``, separate from serving.

Builds the shared clients (a draft replica pool and a Triton replica pool, ``orchestrator.pools``, each
replica with one channel, TLS when configured), the draft circuit breakers, the metrics, the tokenizer and
the limits, registers GenerationService with health and method-aware reflection, and starts listening
(TLS, and mutual TLS, when configured: ``specdec.tls``), refusing request messages over ``max_request_bytes``. The returned
server behaves like a ``grpc.aio.Server`` whose graceful ``stop`` also reports NOT_SERVING first and
closes the clients (and the metrics endpoint) afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry, start_http_server

from orchestrator.breaker import BreakerBoard
from orchestrator.catalog import DrafterCatalog
from orchestrator.clients import DraftClient, TargetClient
from orchestrator.config import OrchestratorConfig
from orchestrator.convert import limits_from
from orchestrator.generation import LoopSettings
from orchestrator.k_policy import PolicySettings
from orchestrator.loop import SpeculativeLoop
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.replicas import PoolSettings
from orchestrator.round_rule import SampleRound, sample_round
from orchestrator.servicer import SERVICE_NAME, GenerationServicer, Tokenizer
from specdec.grpc_server import EXCLUSIVE_PORT, add_health_and_reflection, set_serving
from specdec.hostport import join_host_port
from specdec.models import load_tokenizer, resolve_model_dir
from specdec.tls import add_port, channel_credentials, server_credentials
from specdec.v1 import generation_pb2_grpc

log = logging.getLogger(__name__)

_RELEASE_WAIT_S = 10.0  # on stop: how long ended generations' cache releases may still take
_UNBOUNDED = 10**7  # tokenizers report a huge sentinel when they know no limit


class OrchestratorServer:
    """A started ``grpc.aio.Server`` and what its graceful stop must close; other attributes delegate."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        closers: list[Callable[[], Any]],
        *,
        metrics: OrchestratorMetrics | None = None,
        breakers: BreakerBoard | None = None,
    ) -> None:
        self._server = server
        self.health = health_servicer
        self._closers = closers
        self.metrics = metrics
        self.breakers = breakers

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING, let in-flight generations finish for ``grace`` seconds, wait for their caches'
        releases, then close the clients."""
        await set_serving(self.health, [SERVICE_NAME], False)
        await self._server.stop(grace)
        closers, self._closers = self._closers, []
        for close in closers:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - shutting down; keep closing the rest
                log.exception("closing a client failed")

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def resolve_context_length(config: OrchestratorConfig, tokenizer: Tokenizer) -> int | None:
    """config.context_length, else the model config's max_position_embeddings, else the tokenizer's limit."""
    if config.context_length > 0:
        return config.context_length
    try:
        folder = resolve_model_dir(config.tokenizer, Path(config.cache_dir) if config.cache_dir else None)
        model_config = json.loads((folder / "config.json").read_text())
        for section in (model_config, model_config.get("text_config") or {}):
            for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
                if isinstance(section.get(key), int) and section[key] > 0:
                    return section[key]
    except (OSError, ValueError) as exc:
        log.warning("no model config for %r (%s); using the tokenizer's limit", config.tokenizer, exc)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _UNBOUNDED else None


async def create_server(
    config: OrchestratorConfig,
    *,
    draft_client: DraftClient | None = None,
    target_client: TargetClient | None = None,
    tokenizer: Tokenizer | None = None,
    sample_round: SampleRound = sample_round,
) -> tuple[OrchestratorServer, int]:
    """Build and start the orchestrator; returns the server and its bound port (config.port 0 = a free one).

    Clients not given are built from the config (no draft at all when draft_address is ''). Every client,
    given or built, is closed by the server's ``stop``. ``sample_round`` replaces the round's sampling rule:
    only the negative control of the statistical tests does that; no flag reaches it.
    """
    if tokenizer is None:
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        tokenizer = await asyncio.to_thread(load_tokenizer, config.tokenizer, cache_dir)
    context_length = await asyncio.to_thread(resolve_context_length, config, tokenizer)
    server_creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)  # bad files fail now
    # the port is bound before anything else starts: a taken one fails here, with nothing to undo
    server = grpc.aio.server(options=[EXCLUSIVE_PORT, ("grpc.max_receive_message_length", config.max_request_bytes)])
    port = add_port(server, config.host, config.port, server_creds)
    settings = LoopSettings(
        draft_round_timeout_s=config.draft_round_timeout_s,
        target_steps=config.target_steps,
        target_lookup=config.target_lookup,
        max_target_reprefills=config.max_target_reprefills,
        breaker_failures=config.draft_breaker_failures,
        breaker_cooldown_s=config.draft_breaker_cooldown_s,
    )
    metrics = OrchestratorMetrics(CollectorRegistry())
    breakers = BreakerBoard(
        settings.breaker_failures, settings.breaker_cooldown_s, on_transition=metrics.observe_breaker
    )
    metrics.watch_breaker(lambda: breakers.state)
    pools = []
    if target_client is None or (draft_client is None and config.draft_address):
        from orchestrator.pools import DraftPool, TargetPool  # Triton's protobuf only when really used

        pool_settings = PoolSettings(
            config.resolve_interval_s, config.health_check_interval_s, config.health_check_timeout_s,
            config.health_check_failures,
        )  # fmt: skip
        if target_client is None:
            credentials = channel_credentials(config.triton_tls_ca, config.triton_tls_cert, config.triton_tls_key)
            target_client = TargetPool(
                config.triton_url, config.triton_model, pool_settings, connect_timeout_s=config.target_connect_timeout_s,
                stall_timeout_s=config.target_stall_timeout_s, credentials=credentials,
                server_name=config.triton_tls_server_name,
            )  # fmt: skip
            pools.append(target_client)
        if draft_client is None and config.draft_address:
            credentials = channel_credentials(config.draft_tls_ca, config.draft_tls_cert, config.draft_tls_key)
            draft_client = DraftPool(
                config.draft_address, pool_settings, credentials=credentials, server_name=config.draft_tls_server_name,
                admits=breakers.admits,
            )
            pools.append(draft_client)
    for pool in pools:
        await pool.start()
    closers: list[Callable[[], Any]] = [target_client.close]
    if draft_client is not None:
        closers.append(draft_client.close)

    if pools:
        metrics.watch_replicas(lambda: [state for pool in pools for state in pool.snapshot()])
    if config.metrics_port > 0:
        httpd, _thread = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        closers.append(httpd.shutdown)
        log.info("metrics on http://%s/metrics", join_host_port(config.host, config.metrics_port))

    policy = PolicySettings(
        max_k=config.max_num_draft_tokens, probe_rounds=config.k_probe_rounds, probe_rounds_max=config.k_probe_rounds_max,
        probe_budget=config.k_probe_budget,
    )
    loop = SpeculativeLoop(target_client, draft_client, settings, breakers=breakers, policy=policy,
                           sample_round=sample_round)
    closers.insert(0, functools.partial(loop.wait_released, _RELEASE_WAIT_S))  # before the clients close
    catalog = DrafterCatalog(draft_client)
    await catalog.refresh()  # one try now; the rest in the background
    catalog.start()
    closers.insert(0, catalog.close)
    limits = limits_from(config, len(tokenizer), context_length)
    servicer = GenerationServicer(loop, tokenizer, limits, metrics, catalog)
    closers.append(servicer.close)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    await server.start()
    await set_serving(health_servicer, [SERVICE_NAME], True)
    log.info(
        "orchestrator on %s (%s; draft %s, target %s model %s, context length %s)",
        join_host_port(config.host, port), _tls_mode(config), config.draft_address or "none", config.triton_url,
        config.triton_model, context_length,
    )
    return OrchestratorServer(server, health_servicer, closers, metrics=metrics, breakers=breakers), port


def _tls_mode(config: OrchestratorConfig) -> str:
    if not config.tls_cert:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca else "TLS"
