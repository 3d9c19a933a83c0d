"""Prometheus metrics of one draft server, in a registry of its own (no global state).

Why it exists: operators need to see how many caches are live (capacity planning), how much drafting is
done, how long a round takes (``specdec_draft_round_seconds``: the step latency), and what clients get
(``specdec_draft_requests_total`` by method and status code, errors also in ``specdec_draft_errors_total``); a per-server CollectorRegistry keeps several
servers in one process (tests) from colliding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DraftMetrics:
    """The draft server's metrics; ``serve`` exposes them over HTTP until ``stop``."""

    def __init__(self, live_sequences: Callable[[], int], max_sequences: int) -> None:
        self.registry = CollectorRegistry()
        self.live_sequences = Gauge(
            "specdec_draft_live_sequences", "Sequences holding a KV cache now.", registry=self.registry
        )
        self.live_sequences.set_function(live_sequences)
        self.max_sequences = Gauge(
            "specdec_draft_max_sequences", "Capacity: most sequences held at once.", registry=self.registry
        )
        self.max_sequences.set(max_sequences)
        self.open_streams = Gauge("specdec_draft_open_streams", "Open Propose streams.", registry=self.registry)
        self.proposals = Counter("specdec_draft_proposals", "Draft rounds completed.", registry=self.registry)
        self.draft_tokens = Counter("specdec_draft_tokens", "Draft tokens proposed.", registry=self.registry)
        self.q_bytes = Counter(
            "specdec_draft_q_bytes", "Bytes of q rows sent (packed supports or dense rows).", registry=self.registry
        )
        self.errors = Counter(
            "specdec_draft_errors", "Requests that failed, by gRPC status code.", ["code"], registry=self.registry
        )
        self.requests = Counter(
            "specdec_draft_requests",
            "RPCs answered (a Propose stream counts once, when it ends), by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.round_seconds = Histogram(
            "specdec_draft_round_seconds",
            "Time of one draft round under the model lock (K+1 forwards' worth of work), excluding queueing.",
            buckets=_ROUND_BUCKETS,
            registry=self.registry,
        )
        self._http = None

    def observe_round(self, seconds: float, num_tokens: int, q_bytes: int) -> None:
        self.proposals.inc()
        self.draft_tokens.inc(num_tokens)
        self.q_bytes.inc(q_bytes)
        self.round_seconds.observe(seconds)

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
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
