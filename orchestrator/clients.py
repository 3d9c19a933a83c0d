"""The two dependencies of the speculative loop, as interfaces: a draft and a target, each with sessions.

The loop (``orchestrator.loop``) is written only against these Protocols, so unit tests drive it with
scripted fakes and the transports (gRPC streams to the draft service and to Triton) stay in thin adapters.
A *session* is one generation's conversation with a service under one sequence id: it owns that
sequence's KV cache over there and must be closed (which releases the cache) on every exit path.

The exceptions are the vocabulary both sides share: the adapters map transport errors onto them and the
servicer maps them onto gRPC statuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from specdec.proposal import Proposal
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams
from specdec.target_contract import Decode


class ClientError(Exception):
    """A dependency of the orchestrator failed."""


class DraftError(ClientError):
    """The draft service failed (unavailable, refused, too slow, malformed answer); the loop falls back
    to target-only rounds, which keeps the output's distribution exact."""


class DraftCacheLost(DraftError):
    """The draft service no longer holds the sequence's cache: re-send the prefix with keep_length 0."""


class DraftUnavailable(DraftError):
    """The draft replica cannot be reached (down, connection lost, draining): a replica pool ejects it and
    moves the generation to another replica if it has one."""


class DraftBreakerOpen(DraftError):
    """Every draft replica's circuit breaker is open: the round goes target-only without trying one (not a
    failure of its own)."""


class DraftTimeout(DraftError):
    """A draft round took longer than the configured per-round limit: in a pool with another replica the
    generation moves there, else it finishes target-only."""


class TargetError(ClientError):
    """The target failed in a way the loop cannot recover from."""


class TargetCacheLost(TargetError):
    """The target no longer holds the sequence's cache (evicted, restarted, unknown sequence id): open a
    new session and re-send the whole prefix."""


class TargetConnectionLost(TargetCacheLost):
    """The stream to the target broke under a live sequence (Triton restarted, a connection dropped): the
    cache is gone or out of reach. Re-send the prefix on a new session, which waits (briefly) until the
    target is reachable again."""


class TargetUnavailable(TargetError):
    """The target cannot be reached, or kept losing the cache."""


class TargetCapacityExhausted(TargetError):
    """The target refuses new sequences: it is at capacity."""


class DeadlineExceeded(ClientError):
    """The caller's deadline passed before the generation finished."""


class DraftSession(Protocol):
    """One generation's draft stream (one sequence id)."""

    replica: str  # the replica it runs on (its address), "" for a client without replicas: its circuit breaker

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
        """Crop the context to keep_length, append append_token_ids, propose up to num_draft_tokens (K >= 1)
        tokens with ``drafter`` ("" = the service's default). The draft's noise for the token at context
        position j derives from (seed, j); ``coupled`` makes it the noise the target's own sample uses (the
        coupled mode), and the proposal then needs no q rows. ``cache_length`` of the answer is the new
        context's length (keep_length + len(append_token_ids)).

        Raises DraftCacheLost if the context is gone, DraftError on any other failure."""
        ...

    def can_move(self) -> bool:
        """Could the generation go on in a new session on another replica now (a pool with another healthy
        replica whose circuit breaker admits rounds)? False for a client without replicas."""
        ...

    async def close(self) -> None:
        """End the session and release the draft's cache; idempotent, never raises."""
        ...


class DraftClient(Protocol):
    """Opens draft sessions; one per orchestrator process (shares a channel)."""

    async def open(self, sequence_id: int, *, timeout: float | None = None, avoid: str = "") -> DraftSession:
        """Start a session for sequence_id; ``timeout`` (seconds) bounds the whole session. ``avoid``: a
        replica not to open it on (the one the generation leaves); a client without replicas has none."""
        ...

    async def drafters(self) -> tuple[str, ...]:
        """The drafters the draft service offers, its default first. Raises DraftError if unreachable."""
        ...

    async def close(self) -> None:
        """Close the shared channel (server shutdown)."""
        ...


class TargetSession(Protocol):
    """One generation's target stream (one sequence id = Triton correlation id)."""

    forward_sequences: int  # how many sequences the forward that answered the last score ran (1 = alone)
    forward_tokens: int  # and how many tokens in all, this session's included (0 = not known)

    async def score(
        self, keep_length: int, append_token_ids: Sequence[int], num_logits: int, params: SamplingParams
    ) -> torch.Tensor | PackedRows:
        """Crop the cache to keep_length (0 on the first call: it starts the sequence), feed
        append_token_ids and return p [num_logits, W] float32: the target's distributions at the last
        num_logits positions, warped with ``params`` exactly as ``specdec.sampling.warp`` does (the
        target warps next to the model, so only the rows' support crosses the wire), dense or kept packed.
        W is the vocabulary size V, or less when the rows travel packed: every token beyond W has
        probability 0.

        Raises TargetCacheLost, TargetCapacityExhausted, TargetUnavailable or TargetError."""
        ...

    async def decode(
        self, keep_length: int, append_token_ids: Sequence[int], params: SamplingParams, decode: Decode
    ) -> list[int]:
        """Crop and feed as ``score`` does, then let the target sample up to ``decode.steps`` tokens on its
        own (each token fed to the next; a forward brings one, or several when ``decode.lookup`` lets it verify
        looked-up drafts), drawn from its rows warped with ``params`` by
        `specdec.round_draws` with no drafts, the noise of ``decode.seed`` at each token's position; it stops
        after ``decode.stop_token``. Returns the 1..steps tokens; the cache then holds all but the last.

        Raises as ``score`` does."""
        ...

    async def close(self) -> None:
        """End the sequence and release the target's cache; idempotent, never raises."""
        ...


class TargetClient(Protocol):
    """Opens target sessions; one per orchestrator process (shares a channel)."""

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> TargetSession:
        """Start a session for sequence_id; ``timeout`` (seconds) is the caller's remaining time.

        Raises TargetUnavailable, within a bounded time, if the target cannot be reached."""
        ...

    async def close(self) -> None:
        """Close the shared channel (server shutdown)."""
        ...
