"""The draft and target replica pools: `DraftClient` and `TargetClient` over many replicas, one per generation.

Why it exists: the loop (``orchestrator.loop``) opens one draft session and one target session per
generation and knows nothing of replicas. These pools implement the same Protocols
(``orchestrator.clients``): ``open`` picks a replica (``orchestrator.replicas``: fewest live generations,
healthy first) and delegates to that replica's own client (`GrpcDraftClient`, `TritonTargetClient`); the
session it returns stays pinned to that replica, whose KV cache it uses, until it closes.

Failover, so that losing a replica loses no generation:

* **Target**: a replica that cannot be connected within the connect timeout is ejected and the next is
  tried. A stream that breaks (``TargetConnectionLost``) ejects its replica; the loop then re-sends the
  prefix through ``open``, which picks another replica. A replica that stops answering health checks is
  ejected and its sessions abandoned, so a generation stuck on it moves too. A replica that reports
  itself unavailable mid-generation (Triton stopping, a model stub it reports not healthy), and one that
  leaves a round unanswered for ``stall_timeout_s`` (a model stuck behind a Triton that still reports
  itself ready), is quarantined: ejected, its sessions abandoned, the generation moved like a broken
  stream's, and readmitted only once its model answers a release request of its own (``check_answers``),
  not on Triton's readiness, which such a model passes.
  Only when every replica was tried does ``open`` raise TargetUnavailable, naming the pool and each
  attempt (UNAVAILABLE to the caller).
* **Draft**: a replica that answers UNAVAILABLE is ejected; if another replica is healthy the error
  becomes DraftCacheLost, so the loop re-sends the prefix to a new session, on another replica. A round
  the loop times out moves the generation too (``can_move``, then ``open(avoid=...)``: a stuck replica
  still looks healthy, so it is left out by name). With no other replica the loop finishes the
  generation target-only, as with a single draft. The loop keeps a
  circuit breaker per draft replica (``orchestrator.breaker``); the pool opens new generations on the
  replicas whose breaker admits them first, and with none admitting, on none (``DraftBreakerOpen``).
* A stream that dies with its server does not always say UNAVAILABLE (gRPC core reports INTERNAL at
  times, or the stream is just over): after any other plain failure the replica gets one health check
  on the spot, and if it does not answer it is handled as above.

Health checks go over each replica's own channel: grpc.health.v1 for drafts, KServe ``ServerReady`` +
``ModelReady`` for Triton (and, for a quarantined Triton, the model's answer to a release request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import torch

from orchestrator.clients import (
    DraftBreakerOpen,
    DraftCacheLost,
    DraftError,
    DraftUnavailable,
    TargetConnectionLost,
    TargetError,
    TargetUnavailable,
)
from orchestrator.draft_grpc import GrpcDraftClient, GrpcDraftSession
from orchestrator.replicas import NoReplicaAdmitted, NoReplicaLeft, PoolSettings, Replica, ReplicaPool, ReplicaState
from orchestrator.resolve import Address, Resolver, system_resolver
from orchestrator.target_triton import DEFAULT_CONNECT_TIMEOUT_S, TritonTargetClient, TritonTargetSession
from specdec import target_contract as contract
from specdec.proposal import Proposal
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams
from specdec.tls import channel_options

T = TypeVar("T")


def _options(credentials: grpc.ChannelCredentials | None, server_name: str, address: Address) -> Sequence:
    return channel_options(credentials, server_name or address.server_name)


class _PinnedSession:
    """A session on one replica of a pool: counted on it while open, released from it once, on close."""

    def __init__(self, inner: GrpcDraftSession | TritonTargetSession, replica: Replica, pool: ReplicaPool) -> None:
        self._inner, self._replica, self._pool = inner, replica, pool
        self._closed = False
        pool.attach(replica, self)

    @property
    def replica(self) -> str:
        return self._replica.address

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._inner.close()
        finally:
            self._pool.release(self._replica, self)


class PinnedDraftSession(_PinnedSession):
    """A draft session on one replica of a `DraftPool`."""

    _inner: GrpcDraftSession

    async def propose(
        self,
        keep_length: int,
        append_token_ids: Sequence[int],
        num_draft_tokens: int,
        params: SamplingParams,
        seed: int,
        drafter: str = "",
        coupled: bool = False,
    ) -> Proposal:
        try:
            return await self._inner.propose(
                keep_length, append_token_ids, num_draft_tokens, params, seed, drafter, coupled
            )
        except DraftUnavailable as exc:
            self._pool.eject(self._replica, str(exc))
            self._move_on(exc)
            raise
        except DraftError as exc:
            if type(exc) is DraftError and not await self._pool.answers(self._replica):  # the stream died with it
                self._pool.eject(self._replica, f"{exc}, and its health check fails")
                self._move_on(exc)
            raise

    def can_move(self) -> bool:
        return self._pool.has_healthy_other(self._replica)

    def _move_on(self, exc: DraftError) -> None:
        """With another healthy replica, the loop re-sends the prefix (DraftCacheLost) there instead of
        finishing target-only."""
        if self.can_move():
            raise DraftCacheLost(f"draft replica {self.replica} is unavailable ({exc}); moving on") from exc

    def abandon(self, reason: str) -> None:
        """Nothing to do: a draft round is bounded by the loop's per-round timeout."""


class DraftPool:
    """`DraftClient` over draft replicas (``spec``: endpoints, see ``orchestrator.resolve``)."""

    def __init__(
        self,
        spec: str,
        settings: PoolSettings | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        admits: Callable[[str], bool] = lambda address: True,
        resolver: Resolver = system_resolver,
        make_client: Callable[[Address], GrpcDraftClient] | None = None,
    ) -> None:
        """``admits(address)``: may a round go to that replica now (its circuit breaker, which the loop keeps)?
        New generations open on the replicas it admits first."""

        def make(address: Address) -> GrpcDraftClient:
            options = _options(credentials, server_name, address)
            return GrpcDraftClient(address.address, credentials=credentials, options=options)

        self.pool: ReplicaPool[GrpcDraftClient] = ReplicaPool(
            "draft", spec, make_client or make, lambda client, timeout: client.check_health(timeout), settings,
            admits=admits, resolver=resolver,
        )  # fmt: skip

    async def start(self) -> None:
        await self.pool.start()

    async def open(self, sequence_id: int, *, timeout: float | None = None, avoid: str = "") -> PinnedDraftSession:
        try:
            session, replica = await self.pool.open(sequence_id, timeout, (DraftUnavailable,), avoid)
        except NoReplicaLeft as exc:
            raise DraftUnavailable(str(exc)) from None
        except NoReplicaAdmitted as exc:
            raise DraftBreakerOpen(str(exc)) from None
        return PinnedDraftSession(session, replica, self.pool)

    async def drafters(self) -> tuple[str, ...]:
        """What the pool's replicas offer, asked of the first healthy one that answers (replicas of a pool
        are meant to offer the same drafters)."""
        errors = []
        for replica in self.pool.candidates():
            try:
                return await replica.client.drafters()
            except DraftError as exc:
                errors.append(f"{replica.address}: {exc}")
        raise DraftUnavailable(f"no draft replica answered ({'; '.join(errors) or 'none is healthy'})")

    def snapshot(self) -> list[ReplicaState]:
        return self.pool.snapshot()

    async def close(self) -> None:
        await self.pool.close()


class PinnedTargetSession(_PinnedSession):
    """A target session on one replica of a `TargetPool`."""

    _inner: TritonTargetSession

    def __init__(self, inner: TritonTargetSession, replica: Replica, pool: ReplicaPool, stall_timeout_s: float) -> None:
        super().__init__(inner, replica, pool)
        self._stall_timeout_s = stall_timeout_s

    @property
    def forward_sequences(self) -> int:
        return self._inner.forward_sequences

    @property
    def forward_tokens(self) -> int:
        return self._inner.forward_tokens

    async def score(
        self, keep_length: int, append_token_ids: Sequence[int], num_logits: int, params: SamplingParams
    ) -> torch.Tensor | PackedRows:
        return await self._guard(self._inner.score(keep_length, append_token_ids, num_logits, params))

    async def decode(
        self, keep_length: int, append_token_ids: Sequence[int], params: SamplingParams, decode: contract.Decode
    ) -> list[int]:
        return await self._guard(self._inner.decode(keep_length, append_token_ids, params, decode))

    async def _guard(self, call: Awaitable[T]) -> T:
        """The replica's answer; a replica that broke is ejected (quarantined if its model failed: no answer
        within the stall timeout, or UNAVAILABLE), and the loop told to go elsewhere."""
        try:
            if not self._stall_timeout_s:
                return await call
            return await asyncio.wait_for(call, self._stall_timeout_s)
        except asyncio.TimeoutError:
            why = f"a round got no answer within {self._stall_timeout_s:g} s"
            self._pool.quarantine(self._replica, why)
            raise TargetConnectionLost(f"Triton at {self.replica}: {why}") from None
        except TargetConnectionLost as exc:
            self._pool.eject(self._replica, str(exc))
            raise
        except TargetUnavailable as exc:
            # The replica is going away, or its model is not healthy (a dead or frozen stub, which Triton's
            # readiness does not see): re-send the prefix elsewhere; back once its model answers.
            self._pool.quarantine(self._replica, str(exc))
            raise TargetConnectionLost(str(exc)) from exc
        except TargetError as exc:
            # A stream that dies with its server can end with any status (gRPC core says INTERNAL at times):
            # if the replica does not answer either, it is gone, and the prefix goes elsewhere.
            if type(exc) is TargetError and not await self._pool.answers(self._replica):
                self._pool.eject(self._replica, f"{exc}, and its readiness check fails")
                raise TargetConnectionLost(f"{exc}; Triton at {self.replica} does not answer") from exc
            raise

    def abandon(self, reason: str) -> None:
        abandon = getattr(self._inner, "abandon", None)
        if abandon is not None:
            abandon(reason)


class TargetPool:
    """`TargetClient` over Triton replicas (``spec``: endpoints, see ``orchestrator.resolve``)."""

    def __init__(
        self,
        spec: str,
        model: str = contract.MODEL_NAME,
        settings: PoolSettings | None = None,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        stall_timeout_s: float = 0.0,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        resolver: Resolver = system_resolver,
        make_client: Callable[[Address], TritonTargetClient] | None = None,
    ) -> None:
        """``stall_timeout_s``: a round unanswered this long quarantines its replica (0 = wait for the
        caller's deadline)."""
        if stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s must be >= 0, got {stall_timeout_s}")
        self._stall_timeout_s = stall_timeout_s

        def make(address: Address) -> TritonTargetClient:
            options = _options(credentials, server_name, address)
            return TritonTargetClient(
                address.address, model, connect_timeout_s=connect_timeout_s, credentials=credentials, options=options
            )

        self.pool: ReplicaPool[TritonTargetClient] = ReplicaPool(
            "target", spec, make_client or make, lambda client, timeout: client.check_ready(timeout), settings,
            answer_check=lambda client, timeout: client.check_answers(timeout), resolver=resolver,
        )  # fmt: skip

    async def start(self) -> None:
        await self.pool.start()

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> PinnedTargetSession:
        try:
            session, replica = await self.pool.open(sequence_id, timeout, (TargetUnavailable,))
        except NoReplicaLeft as exc:
            raise TargetUnavailable(str(exc)) from None
        return PinnedTargetSession(session, replica, self.pool, self._stall_timeout_s)

    def snapshot(self) -> list[ReplicaState]:
        return self.pool.snapshot()

    async def close(self) -> None:
        await self.pool.close()
