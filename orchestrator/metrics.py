"""Prometheus metrics of one orchestrator process, in a registry of its own (no global state).

Why it exists: an operator must see, per orchestrator, what callers get (requests by status code), what
the speculation is worth (acceptance rate per generation, accepted tokens per round and per draft
position, tokens by kind), where a round's time goes (draft / target / orchestrator), how many
generations are live, and how the dependencies behave (draft fallbacks by reason, the draft circuit
breaker, target re-prefills). The servicer feeds it; nothing below the servicer knows it exists.

Names (Counters get ``_total`` from prometheus_client):

- ``specdec_orchestrator_requests_total{method, code}``: RPCs answered, by gRPC status name (a request
  message over ``max_request_bytes`` is refused by gRPC itself before the servicer runs: not counted)
- ``specdec_orchestrator_live_generations``: generations running now (gauge)
- ``specdec_orchestrator_generations_total{outcome}``: finished generations, by finish reason or error kind
- ``specdec_orchestrator_generation_seconds``: wall time per generation (histogram)
- ``specdec_orchestrator_tokens_total{kind}``: prompt | drafted | accepted | emitted | decoded tokens (decoded:
  emitted by target-only rounds the target decoded on its own)
- ``specdec_orchestrator_rounds_total{mode}``: speculative | target_only | draft_fallback rounds
- ``specdec_orchestrator_round_seconds{stage}``: per-round wall time, draft | target | orchestrator | total
- ``specdec_orchestrator_acceptance_rate``: accepted / drafted per generation that drafted (histogram)
- ``specdec_orchestrator_accepted_tokens_per_round``: drafts accepted per speculative round (histogram)
- ``specdec_orchestrator_accepted_per_position_total{position}``: rounds that accepted draft position i (1-based)
- ``specdec_orchestrator_draft_fallbacks_total{reason}``: generations that ran target-only rounds, by reason
  (error | timeout | breaker_open | no_draft: a fixed K asked of a deployment without a draft; auto K there runs
  K = 0 rounds, which are no fallback)
- ``specdec_orchestrator_draft_fallback_rounds_total``: target-only rounds that wanted drafts
- ``specdec_orchestrator_draft_breaker_state``: the draft circuit breakers (one per draft replica), the most
  open of them: 0 all closed, 1 one half-open, 2 one open (which: ``replica_admitted`` below, and the log)
- ``specdec_orchestrator_draft_breaker_transitions_total{state}``: transitions of any of them, by new state
- ``specdec_orchestrator_target_reprefills_total``: target caches re-sent (evicted, Triton restarted)
- ``specdec_orchestrator_chosen_k``: the K each round ran with (histogram; under auto, the K chosen)
- ``specdec_orchestrator_speculation_off_rounds_total``: rounds auto ran target-only because drafting did
  not pay; ``specdec_orchestrator_probe_rounds_total``: rounds auto drafted to see whether it pays again
- ``specdec_orchestrator_replica_live_generations{pool, replica}``: sessions open on each draft / target
  replica now (read from the replica pools at scrape time)
- ``specdec_orchestrator_replica_generations_total{pool, replica}``: sessions opened on each replica
- ``specdec_orchestrator_replica_healthy{pool, replica}``: 1 while a replica takes new generations, 0 ejected
- ``specdec_orchestrator_replica_ejections_total{pool, replica}``: times a replica was ejected
- ``specdec_orchestrator_replica_admitted{pool, replica}``: 0 while a draft replica's circuit breaker is open
  (rounds skip it, new generations go elsewhere), else 1; always 1 for Triton replicas
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from orchestrator.breaker import BreakerState
from orchestrator.loop import GenerationStats, Round
from orchestrator.replicas import ReplicaState

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RATE_BUCKETS = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0
_ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
_K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)


class OrchestratorMetrics:
    """The orchestrator's series."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, "specdec_orchestrator_"
        self.requests = Counter(
            p + "requests", "RPCs answered, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.live_generations = Gauge(p + "live_generations", "Generations running now", registry=r)
        self.generations = Counter(p + "generations", "Finished generations by outcome", ["outcome"], registry=r)
        self.generation_seconds = Histogram(
            p + "generation_seconds", "Wall time per generation", buckets=_GENERATION_BUCKETS, registry=r
        )
        self.tokens = Counter(p + "tokens", "Tokens by kind", ["kind"], registry=r)
        self.rounds = Counter(p + "rounds", "Rounds by mode", ["mode"], registry=r)
        self.round_seconds = Histogram(
            p + "round_seconds", "Per-round wall time by stage", ["stage"], buckets=_SECONDS_BUCKETS, registry=r
        )
        self.acceptance_rate = Histogram(
            p + "acceptance_rate", "Accepted / drafted tokens per generation that drafted", buckets=_RATE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.accepted_per_round = Histogram(
            p + "accepted_tokens_per_round", "Draft tokens accepted per speculative round", buckets=_ACCEPTED_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.accepted_per_position = Counter(
            p + "accepted_per_position", "Rounds that accepted the draft token at a position (1-based)", ["position"],
            registry=r,
        )  # fmt: skip
        self.draft_fallbacks = Counter(
            p + "draft_fallbacks", "Generations that ran target-only rounds instead of drafting, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.draft_fallback_rounds = Counter(
            p + "draft_fallback_rounds", "Rounds run target-only although they wanted drafts", registry=r
        )
        self.breaker_state = Gauge(
            p + "draft_breaker_state", "Draft circuit breakers, the most open: 0 closed, 1 half-open, 2 open",
            registry=r,
        )
        self.breaker_transitions = Counter(
            p + "draft_breaker_transitions", "Draft circuit breaker transitions, by new state", ["state"], registry=r
        )
        self.target_reprefills = Counter(p + "target_reprefills", "Target caches re-sent", registry=r)
        self.chosen_k = Histogram(
            p + "chosen_k", "K each round ran with (under auto: the K chosen)", buckets=_K_BUCKETS, registry=r
        )
        self.speculation_off_rounds = Counter(
            p + "speculation_off_rounds", "Rounds auto K ran target-only because drafting did not pay", registry=r
        )
        self.probe_rounds = Counter(
            p + "probe_rounds", "Rounds auto K drafted while off, to see whether drafting pays again", registry=r
        )

    def watch_replicas(self, states: Callable[[], Iterable[ReplicaState]]) -> None:
        """Report the replica pools' per-replica counts, read at scrape time from ``states()``."""
        self.registry.register(_ReplicaCollector(states))

    def observe_request(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.labels(method=method, code=code.name).inc()

    def watch_breaker(self, state: Callable[[], BreakerState]) -> None:
        """Report the breaker's state (read at scrape time) on the state gauge."""
        self.breaker_state.set_function(lambda: float(state().value))

    def observe_breaker(self, state: BreakerState) -> None:
        self.breaker_transitions.labels(state=state.name.lower()).inc()

    def observe_round(self, round_: Round) -> None:
        stages = {
            "draft": round_.draft_s,
            "target": round_.target_s,
            "orchestrator": max(0.0, round_.seconds - round_.draft_s - round_.target_s),
            "total": round_.seconds,
        }
        for stage, seconds in stages.items():
            self.round_seconds.labels(stage=stage).observe(seconds)
        self.chosen_k.observe(round_.num_draft_tokens)
        self.speculation_off_rounds.inc(round_.speculation_off)
        self.probe_rounds.inc(round_.probe)
        if round_.num_draft_tokens and not round_.draft_fallback:
            self.rounds.labels(mode="speculative").inc()
            self.accepted_per_round.observe(round_.accepted)
            for position in range(1, round_.accepted + 1):
                self.accepted_per_position.labels(position=str(position)).inc()
        elif round_.draft_fallback:
            self.rounds.labels(mode="draft_fallback").inc()
        else:
            self.rounds.labels(mode="target_only").inc()

    def observe_generation(self, outcome: str, stats: GenerationStats) -> None:
        self.generations.labels(outcome=outcome).inc()
        self.generation_seconds.observe(stats.total_time_s)
        for kind in ("prompt", "drafted", "accepted", "emitted", "decoded"):
            self.tokens.labels(kind=kind).inc(getattr(stats, f"{kind}_tokens"))
        if stats.drafted_tokens:
            self.acceptance_rate.observe(stats.acceptance_rate)
        if stats.draft_fallback_rounds:
            self.draft_fallbacks.labels(reason=stats.draft_fallback_reason or "unknown").inc()
            self.draft_fallback_rounds.inc(stats.draft_fallback_rounds)
        self.target_reprefills.inc(stats.target_reprefills)


class _ReplicaCollector:
    """The replica pools' per-replica series, built from a snapshot at each scrape."""

    def __init__(self, states: Callable[[], Iterable[ReplicaState]]) -> None:
        self._states = states

    def describe(self) -> list[Metric]:
        return []  # series appear and vanish with the replicas

    def collect(self) -> Iterator[Metric]:
        p, labels = "specdec_orchestrator_replica_", ["pool", "replica"]
        live = GaugeMetricFamily(p + "live_generations", "Sessions open on each replica now", labels=labels)
        opened = CounterMetricFamily(p + "generations", "Sessions opened on each replica", labels=labels)
        healthy = GaugeMetricFamily(p + "healthy", "1 while a replica takes new generations, 0 ejected", labels=labels)
        ejections = CounterMetricFamily(p + "ejections", "Times a replica was ejected", labels=labels)
        admitted = GaugeMetricFamily(p + "admitted", "1 while its circuit breaker lets rounds through", labels=labels)
        for state in self._states():
            key = [state.pool, state.address]
            live.add_metric(key, state.live)
            opened.add_metric(key, state.opened)
            healthy.add_metric(key, 1.0 if state.healthy else 0.0)
            ejections.add_metric(key, state.ejections)
            admitted.add_metric(key, 1.0 if state.admitted else 0.0)
        yield from (live, opened, healthy, ejections, admitted)
