"""Prometheus metrics of one draft server, in a registry of its own (no global state).

Why it exists: operators need to see how many sequences are live (capacity planning), how much drafting each
drafter does, how long a round takes (``specdec_draft_round_seconds``), how well the model's steps batch
(``specdec_draft_forward_sequences_total`` / ``specdec_draft_forwards_total``) and whether they are stuck
(``specdec_draft_forward_stalled_seconds``), how big the suffix cache is, and what clients get
(``specdec_draft_requests_total`` by method and status code, errors also in ``specdec_draft_errors_total``); a
per-server CollectorRegistry keeps several servers in one process (tests) from colliding.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from draft_service.core import DraftStats
from specdec.hostport import join_host_port

log = logging.getLogger(__name__)

_ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DraftMetrics:
    """The draft server's metrics; ``serve`` exposes them over HTTP until ``stop``."""

    def __init__(
        self, stats: Callable[[], DraftStats], max_sequences: int, stalled_s: Callable[[], float] = lambda: 0.0
    ) -> None:
        self.registry = r = CollectorRegistry()
        gauge = functools.partial(Gauge, registry=r)
        counter = functools.partial(Counter, registry=r)
        gauge("specdec_draft_live_sequences", "Sequences holding state (context, KV cache) now.").set_function(
            lambda: stats().live_sequences
        )
        gauge("specdec_draft_max_sequences", "Capacity: most sequences held at once.").set(max_sequences)
        gauge("specdec_draft_suffix_cache_entries", "Suffixes in the suffix drafter's cache of recent outputs.").set_function(
            lambda: stats().suffix_cache_entries
        )
        gauge("specdec_draft_suffix_cache_bytes", "Estimated bytes of that cache.").set_function(
            lambda: stats().suffix_cache_bytes
        )
        gauge("specdec_draft_kv_bytes", "Bytes of KV cache the model drafter holds for live sequences.").set_function(
            lambda: stats().kv_bytes
        )
        gauge(
            "specdec_draft_forward_stalled_seconds",
            "Seconds the model's forward loop has had work without finishing a forward (0 while idle; alert on it).",
        ).set_function(stalled_s)
        self.open_streams = gauge("specdec_draft_open_streams", "Open Propose streams.")
        self.proposals = counter("specdec_draft_proposals", "Draft rounds completed, by drafter.", ["drafter"])
        self.draft_tokens = counter("specdec_draft_tokens", "Draft tokens proposed, by drafter.", ["drafter"])
        self.q_bytes = counter("specdec_draft_q_bytes", "Bytes of q rows sent (packed supports or dense rows).")
        self.errors = counter("specdec_draft_errors", "Requests that failed, by gRPC status code.", ["code"])
        self.requests = counter(
            "specdec_draft_requests",
            "RPCs answered (a Propose stream counts once, when it ends), by method and gRPC status code.",
            ["method", "code"],
        )
        self.forwards = counter("specdec_draft_forwards", "Forward passes of the draft model (every stream's steps batched).")
        self.forward_sequences = counter(
            "specdec_draft_forward_sequences", "Sequences in those forward passes (divide by the forwards for the mean batch)."
        )
        self.round_seconds = Histogram(
            "specdec_draft_round_seconds", "Time of one draft round in the service, from request to proposal.",
            buckets=_ROUND_BUCKETS, registry=r,
        )
        self._http = None

    def observe_round(self, seconds: float, drafter: str, num_tokens: int, q_bytes: int) -> None:
        self.proposals.labels(drafter=drafter).inc()
        self.draft_tokens.labels(drafter=drafter).inc(num_tokens)
        self.q_bytes.inc(q_bytes)
        self.round_seconds.observe(seconds)

    def observe_forward(self, sequences: int) -> None:
        self.forwards.inc()
        self.forward_sequences.inc(sequences)

    def count_error(self, code: grpc.StatusCode) -> None:
        self.errors.labels(code=code.name).inc()

    def count_request(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.labels(method=method, code=code.name).inc()
        if code is not grpc.StatusCode.OK:
            self.count_error(code)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (a background thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = int(server.server_port)
        log.info("metrics on http://%s/metrics", join_host_port(host, bound))
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
