"""The speculative loop (docs/architecture.md, "One round"): draft K tokens, score them on the target, rejection-sample, repeat.

This is the heart of the orchestrator, so it is written only against ``orchestrator.clients`` (no grpc,
protobuf or tritonclient here) and unit-tested with scripted fakes. One generation is an async generator
of `Round` results; whatever ends it (done, a stop string found by the caller, the caller closing the
generator early, the deadline, an error) both sessions are closed, which releases both caches. The closes
run in a task the loop keeps (``SpeculativeLoop.wait_released``), so the caller's answer does not wait for
the two acknowledgements (a full round trip to each service): the release messages go out at once,
and each service handles them before anything later on the same stream or model instance.

K per round: fixed by the request, or chosen before each round by the generation's `KPolicy` from past
rounds only (``orchestrator.k_policy``; K = 0 when drafting does not pay). The draft may propose fewer
than K tokens (a lookup drafter whose match runs out); none at all makes a target-only round: a decode
under auto K, one scored token under a fixed K. A round with K = 0 (or without a draft) asks the target
to *decode* up to ``LoopSettings.target_steps`` tokens on its own, a forward per token or fewer (below), sampled
with this generation's own rule and noise (`specdec.round_draws`): the same tokens, without a round trip per token.
Unless the request set K = 0, each of those forwards also verifies up to ``LoopSettings.target_lookup``
drafts the target looks up in the sequence's own tokens (`specdec.lookup`): speculation with no hop, which
the K policy sees as a cheaper target-only token.

Bookkeeping per round, with ``n`` of the proposed drafts accepted and ``L`` = tokens before the round: the
target fed every draft, so its valid cache is ``L + n`` (the emitted last token is not fed yet); the
draft's context is ``L`` (drafts are never part of it; a model drafter reuses the ones it fed itself). The
next round crops each cache to its valid length (after a decode of m tokens the target holds ``L + m - 1``) and appends the tokens it has not seen, so a draft that
sat out rounds (speculation off) catches up by appending what it missed.

Failures: a failing draft (unreachable, too slow, its cache lost twice) turns the rest of the generation
into target-only rounds (K = 0 through the same path: still exactly the target's distribution), and counts
towards the circuit breaker of the replica it ran on (``orchestrator.breaker``; a draft without replicas
has one): while it is open, rounds skip that replica without trying it, and a pool opens new generations
on the others. A target that lost its cache (evicted, Triton restarted, the stream broke) is re-sent the
whole prefix under a new sequence id, a bounded number of times.

Every log line about a generation starts with ``sequence_id=<id>`` (the generation's first id; re-prefills
under new ids say so in the message).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import torch

from orchestrator.breaker import BreakerBoard, CircuitBreaker
from orchestrator.clients import (
    DeadlineExceeded,
    DraftBreakerOpen,
    DraftCacheLost,
    DraftClient,
    DraftError,
    DraftSession,
    DraftTimeout,
    TargetCacheLost,
    TargetClient,
    TargetError,
    TargetSession,
    TargetUnavailable,
)
from orchestrator.generation import FinishReason, GenerationRequest, GenerationStats, LoopSettings, Round
from orchestrator.k_policy import GREEDY, SAMPLE, Choice, KPolicy, PolicySettings, RoundOutcome, SharedEstimates
from orchestrator.round_rule import SampleRound, sample_round
from specdec.logs import SequenceLogger
from specdec.proposal import Proposal
from specdec.rows import PackedRows
from specdec.sampling import RejectionResult
from specdec.target_contract import Decode

log = logging.getLogger(__name__)

T = TypeVar("T")


def random_sequence_id() -> int:
    """A random non-zero 63-bit id (fits Triton's int64 correlation id and the draft's uint64 key)."""
    while True:
        value = secrets.randbits(63)
        if value:
            return value


class SpeculativeLoop:
    """Runs generations against a target and (optionally) a draft; holds no per-generation state.

    What generations share: the draft's circuit breakers, one per replica (``breakers``; built from the
    settings unless given) and the K policy's process-wide estimates (``estimates``: acceptance, costs)."""

    def __init__(
        self,
        target: TargetClient,
        draft: DraftClient | None,
        settings: LoopSettings | None = None,
        *,
        new_sequence_id: Callable[[], int] = random_sequence_id,
        breakers: BreakerBoard | None = None,
        policy: PolicySettings | None = None,
        sample_round: SampleRound = sample_round,
    ) -> None:
        self.target = target
        self.draft = draft
        self.sample_round = sample_round
        self.settings = settings or LoopSettings()
        self.estimates = SharedEstimates(policy or PolicySettings())  # what auto K learns, process-wide
        self.new_sequence_id = new_sequence_id
        if breakers is None:
            breakers = BreakerBoard(self.settings.breaker_failures, self.settings.breaker_cooldown_s)
        self.breakers = breakers
        self._releases: set[asyncio.Task] = set()  # ended generations' cache releases under way

    async def wait_released(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s for the releases under way now (server shutdown, tests); True if done."""
        pending = set(self._releases)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            return not still
        return True

    def _release_later(self, release: Awaitable[None]) -> None:
        task = asyncio.ensure_future(release)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def generate(self, request: GenerationRequest, stats: GenerationStats | None = None) -> AsyncIterator[Round]:
        """An async generator of the generation's rounds; the last has ``finish_reason`` set.

        Close it (``contextlib.aclosing``) when stopping early: that starts the release of both caches."""
        return _Generation(self, request, stats).run()


class _Generation:
    """The state of one generation: tokens, sessions, valid cache lengths, the K policy."""

    def __init__(self, loop: SpeculativeLoop, request: GenerationRequest, stats: GenerationStats | None) -> None:
        self.loop = loop
        self.request = request
        self.tokens: list[int] = list(request.prompt_token_ids)  # prompt + emitted
        auto = request.num_draft_tokens is None
        k = loop.estimates.settings.max_k if auto else request.num_draft_tokens
        self.policy = KPolicy(loop.estimates, request.drafter, GREEDY if request.params.greedy else SAMPLE)
        self.stats = stats or GenerationStats()
        self.stats.num_draft_tokens, self.stats.auto_num_draft_tokens = k, auto
        self.stats.drafter, self.stats.seed, self.stats.reproducible = request.drafter, request.seed, request.reproducible
        self.stats.prompt_tokens = len(self.tokens)
        self.stats.accepted_per_position = [0] * k
        self.stats.rounds_by_k = [0] * (k + 1)
        sequence_id = loop.new_sequence_id()
        self.stats.sequence_id = sequence_id
        self.log = SequenceLogger(log, sequence_id)
        self.draft_sequence_id = sequence_id
        self.target_sequence_id = sequence_id
        self.draft_session: DraftSession | None = None
        self.draft_replica = ""  # where the draft session runs (or ran): whose circuit breaker counts its rounds
        self.target_session: TargetSession | None = None
        self.draft_valid = 0  # tokens of self.tokens the draft's cache holds
        self.target_valid = 0  # tokens of self.tokens the target's cache holds
        self.draft_failed = loop.draft is None
        self.draft_reprefills = 0

    async def run(self) -> AsyncIterator[Round]:
        request, stats = self.request, self.stats
        limit, limit_reason = self._limit()
        emitted = 0
        self.log.debug("started: prompt_tokens=%d limit=%d k=%s", len(self.tokens), limit,
                       "auto" if request.num_draft_tokens is None else request.num_draft_tokens)
        try:
            while True:
                self._remaining()  # raises once the deadline has passed
                round_started, draft_before, target_before = time.monotonic(), stats.draft_time_s, stats.target_time_s
                choice = self._choose(limit - emitted - 1)  # never draft past the limit
                k = choice.k
                proposal = await self._propose(k) if k > 0 else None
                drafts = list(proposal.token_ids) if proposal is not None else []
                steps = self._decode_steps(k, proposal, limit - emitted)
                if steps:  # target-only: the target samples up to `steps` tokens on its own
                    tokens = await self._decode(steps)
                    accepted, fed = 0, len(tokens) - 1  # the target fed all but the last
                else:
                    p = await self._score(drafts)  # [len(drafts) + 1, V]
                    result = self._rejection_sample(drafts, proposal.q if proposal is not None else None, p)
                    tokens, accepted, fed = result.tokens, result.accepted, result.accepted

                before = len(self.tokens)
                self.target_valid = before + fed
                if proposal is not None:
                    self.draft_valid = before  # the draft's context: drafts are never part of it
                self._count(choice, proposal, drafts, accepted, len(tokens), decoded=steps > 0)

                new = tokens[: limit - emitted]
                finish = None
                if request.eos_token_id is not None and request.eos_token_id in new:
                    new = new[: new.index(request.eos_token_id)]
                    finish = FinishReason.EOS
                elif emitted + len(new) >= limit:
                    finish = limit_reason
                self.tokens.extend(new)
                emitted += len(new)
                round_ = Round(
                    new, k, accepted, finish, stats,
                    draft_fallback=k > 0 and proposal is None, proposed=len(drafts),
                    speculation_off=choice.off, probe=choice.probe, seconds=time.monotonic() - round_started,
                    draft_s=stats.draft_time_s - draft_before, target_s=stats.target_time_s - target_before,
                )  # fmt: skip
                if not round_.draft_fallback:
                    target = self.target_session
                    self.policy.observe(RoundOutcome(
                        k, len(drafts), accepted, round_.draft_s, round_.target_s,
                        max(0.0, round_.seconds - round_.draft_s - round_.target_s),
                        target.forward_sequences if target else 1, target.forward_tokens if target else 0,
                        steps=len(tokens) if steps else 1, speculating=request.num_draft_tokens != 0,
                    ))  # fmt: skip
                yield round_
                if finish is not None:
                    return
        finally:
            stats.finished_at = time.monotonic()
            self.loop._release_later(self._release())

    def _choose(self, room: int) -> Choice:
        """This round's K: the request's, or the policy's; never more than ``room`` tokens. Under auto K, a
        loop without a draft runs K = 0 rounds (the target's own lookups still speculate): no draft was
        lost, so none of them is a draft fallback. A fixed K > 0 there is one, reported as ``no_draft``."""
        if self._fixed_k:
            return Choice(max(0, min(self.request.num_draft_tokens, room)))
        if self.loop.draft is None:
            return Choice(0)
        return self.policy.choose(room)

    def _decode_steps(self, k: int, proposal: Proposal | None, room: int) -> int:
        """How many tokens the target decodes on its own this round: 0 = a scored round. A round without
        drafts decodes up to ``target_steps`` tokens (never past the limit): K is 0, the draft is out of the
        generation, or, with K chosen by the policy, the drafter found nothing to propose (the round cost one
        draft call; the target's own lookups still run, and the policy counts a miss). Only a fixed K scores
        a round whose drafter found nothing, so that the next position gets its K drafts asked for."""
        target_steps = self.loop.settings.target_steps
        if target_steps <= 1 or k > 0 and proposal is not None and (proposal.token_ids or self._fixed_k):
            return 0
        return max(1, min(target_steps, room))

    @property
    def _fixed_k(self) -> bool:
        return self.request.num_draft_tokens is not None

    def _count(
        self, choice: Choice, proposal: Proposal | None, drafts: list[int], accepted: int, emitted: int, decoded: bool
    ) -> None:
        stats = self.stats
        stats.rounds += 1
        if decoded:
            stats.decoded_rounds += 1
            stats.decoded_tokens += emitted
        stats.rounds_by_k[choice.k] += 1
        stats.drafted_tokens += len(drafts)
        stats.accepted_tokens += accepted
        stats.emitted_tokens += emitted
        for i in range(accepted):
            stats.accepted_per_position[i] += 1
        if choice.k > 0 and proposal is None:
            stats.draft_fallback_rounds += 1
        stats.speculation_off_rounds += choice.off
        stats.probe_rounds += choice.probe

    def _limit(self) -> tuple[int, FinishReason]:
        limit, reason = self.request.max_new_tokens, FinishReason.LENGTH
        if self.request.context_length is not None:
            room = self.request.context_length - len(self.tokens)
            if room < limit:
                limit, reason = room, FinishReason.CONTEXT_LENGTH
        return limit, reason

    def _remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None = no deadline); DeadlineExceeded once it passed."""
        if self.request.deadline is None:
            return None
        remaining = self.request.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the generation finished")
        return remaining

    def _rejection_sample(
        self, drafts: list[int], q: torch.Tensor | PackedRows | None, p: torch.Tensor | PackedRows
    ) -> RejectionResult:
        return self.loop.sample_round(drafts, q, p, self.request, len(self.tokens))

    # --- draft ---------------------------------------------------------------------------------------

    async def _propose(self, k: int) -> Proposal | None:
        """The draft's k tokens, or None for a target-only round: no draft, an earlier draft failure in
        this generation, an open circuit breaker, or a draft failure now (then the rest goes target-only).

        Breakers (``orchestrator.breaker``): the round goes through its replica's (the session's ``replica``);
        before a session is open, the draft client's own (``""``) decides whether to open one at all."""
        if self.draft_failed:
            self._fallback("no_draft" if self.loop.draft is None else "error")
            return None
        breakers = self.loop.breakers
        if self.draft_session is None and not breakers.admits(""):  # failing as a whole: not even a stream
            self._fallback("breaker_open")
            return None
        started = time.monotonic()
        gate = None  # the breaker that let this round through
        try:
            if self.draft_session is None:
                await self._open_draft()
            gate = breakers.get(self.draft_replica)
            if not gate.allow():
                gate = None
                self._fallback("breaker_open")
                return None
            proposal = await self._propose_once_or_reprefill(k)
        except DraftBreakerOpen:  # a pool whose every replica's breaker is open: none was tried
            if gate is not None:  # a re-prefill found nowhere to go
                gate.record_abandoned()
            self._fallback("breaker_open")
            return None
        except DraftError as exc:
            self._settle(gate, failed=True)
            self._fallback("timeout" if isinstance(exc, DraftTimeout) else "error")
            self.log.warning("draft failed (%s); finishing the generation target-only", exc)
            self.draft_failed = True
            await self._close_draft()
            return None
        except BaseException:  # deadline, cancellation, a bug: nothing learnt about the draft
            if gate is not None:
                gate.record_abandoned()
            raise
        finally:
            self.stats.draft_time_s += time.monotonic() - started
        self._settle(gate, failed=False)
        return proposal

    def _settle(self, gate: CircuitBreaker | None, *, failed: bool) -> None:
        """Count the round on the breaker of the replica it ended on (a re-prefill may have moved it, and
        an open that failed everywhere counts on the client's own); free ``gate`` if that is another."""
        breaker = self.loop.breakers.get(self.draft_replica)
        if failed:
            breaker.record_failure()
        else:
            breaker.record_success()
        if gate is not None and gate is not breaker:
            gate.record_abandoned()

    async def _open_draft(self, avoid: str = "") -> None:
        """A new draft session for ``draft_sequence_id`` (not on replica ``avoid``); a pool's says which
        replica it runs on."""
        assert self.loop.draft is not None
        self.draft_replica = ""  # an open that fails counts on the draft client's own breaker
        opening = self.loop.draft.open(self.draft_sequence_id, timeout=self._remaining(), avoid=avoid)
        self.draft_session = await self._call_draft(opening)
        self.draft_valid = 0
        self.draft_replica = self.draft_session.replica
        if self.draft_replica:  # a pool found a replica that opens: as a whole, the draft client works
            self.loop.breakers.get("").record_success()

    def _fallback(self, reason: str) -> None:
        if not self.stats.draft_fallback_reason:
            self.stats.draft_fallback_reason = reason

    async def _propose_once_or_reprefill(self, k: int) -> Proposal:
        """The round's proposal. The prefix is re-sent to a new session (up to ``max_draft_reprefills`` times
        per generation) when the draft lost its cache, or when the round timed out on a pool's replica and
        another could take it: a stuck replica still answers health checks, so it is left out by name."""
        assert self.loop.draft is not None
        while True:
            if self.draft_session is None:
                await self._open_draft()
            keep, append = self.draft_valid, self.tokens[self.draft_valid :]
            spent = self.draft_reprefills >= self.loop.settings.max_draft_reprefills
            try:
                proposal = await self._call_draft(
                    self.draft_session.propose(
                        keep, append, k, self.request.params, self.request.seed, self.request.drafter,
                        self.request.reproducible,
                    )
                )
            except DraftCacheLost:
                if spent:
                    raise
                why, avoid = "draft cache lost", ""
            except DraftTimeout as exc:
                if spent or not self.draft_session.can_move():
                    raise
                why, avoid = f"{exc} on draft replica {self.draft_replica}", self.draft_replica
                self.loop.breakers.get(avoid).record_failure()  # counted where it happened; the round goes on
            else:
                _check_proposal(proposal, keep, len(append), k)
                return proposal
            self.draft_reprefills += 1
            await self._close_draft()
            self.draft_sequence_id = self.loop.new_sequence_id()  # never race the old stream's release
            level = logging.WARNING if avoid else logging.INFO  # a replica that stalls is news; a lost cache is not
            self.log.log(level, "%s; re-sending the prefix as draft_sequence_id=%d", why, self.draft_sequence_id)
            await self._open_draft(avoid)

    async def _call_draft(self, call: Awaitable[T]) -> T:
        remaining = self._remaining()
        limit = self.loop.settings.draft_round_timeout_s or None
        timeout = remaining if limit is None else limit if remaining is None else min(limit, remaining)
        try:
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            if remaining is not None and (limit is None or remaining <= limit):
                raise DeadlineExceeded("the deadline passed while waiting for the draft") from None
            raise DraftTimeout(f"a draft round took longer than {limit} s") from None

    async def _close_draft(self) -> None:
        session, self.draft_session = self.draft_session, None
        if session is not None:
            await session.close()

    # --- target --------------------------------------------------------------------------------------

    async def _score(self, drafts: list[int]) -> torch.Tensor | PackedRows:
        """Warped target rows p [len(drafts) + 1, V] for the last positions of tokens[target_valid:] + drafts."""
        num_logits, params = len(drafts) + 1, self.request.params
        p = await self._on_target(lambda session, keep, append: session.score(keep, append, num_logits, params), drafts)
        if p.dim() != 2 or p.shape[0] != num_logits or p.shape[1] < 1:
            raise TargetError(f"target returned rows {tuple(p.shape)}, expected [{num_logits}, V]")
        return p

    async def _decode(self, steps: int) -> list[int]:
        """1..steps tokens the target samples on its own after tokens[target_valid:], with the round rule and
        noise of this generation (`specdec.round_draws`); it stops early after the EOS token. Unless the
        request turned speculation off (K = 0), its forwards also verify drafts looked up next to the model."""
        request = self.request
        eos = request.eos_token_id if request.eos_token_id is not None else -1
        lookup = 0 if request.num_draft_tokens == 0 else self.loop.settings.target_lookup  # K = 0: speculation off
        decode = Decode(steps, request.seed, request.reproducible, eos, lookup)
        tokens = await self._on_target(
            lambda session, keep, append: session.decode(keep, append, request.params, decode), []
        )
        if not 1 <= len(tokens) <= steps or min(tokens) < 0:
            raise TargetError(f"target decoded {list(tokens)[:16]}, expected 1 to {steps} token ids")
        return list(tokens)

    async def _on_target(self, ask: Callable[[TargetSession, int, list[int]], Awaitable[T]], drafts: list[int]) -> T:
        """``ask(session, keep, append)`` with append = tokens[target_valid:] + drafts: the session opened
        first if need be, and the whole prefix re-sent under a new sequence id if the target lost it."""
        started = time.monotonic()
        try:
            while True:
                if self.target_session is None:
                    self.target_session = await self._call_target(
                        self.loop.target.open(self.target_sequence_id, timeout=self._remaining())
                    )
                    self.target_valid = 0
                append = self.tokens[self.target_valid :] + drafts
                try:
                    return await self._call_target(ask(self.target_session, self.target_valid, append))
                except TargetCacheLost as exc:
                    await self._reprefill_target(exc)
        finally:
            self.stats.target_time_s += time.monotonic() - started

    async def _reprefill_target(self, exc: TargetCacheLost) -> None:
        self.stats.target_reprefills += 1
        if self.stats.target_reprefills > self.loop.settings.max_target_reprefills:
            raise TargetUnavailable(
                f"the target lost the sequence cache {self.stats.target_reprefills} times; giving up ({exc})"
            ) from exc
        await self._close_target()
        self.target_sequence_id = self.loop.new_sequence_id()
        self.log.warning(
            "target lost the cache (%s); re-sending the prefix as target_sequence_id=%d", exc, self.target_sequence_id
        )

    async def _call_target(self, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, self._remaining())
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the deadline passed while waiting for the target") from None

    async def _close_target(self) -> None:
        session, self.target_session = self.target_session, None
        if session is not None:
            await session.close()

    # --- release -------------------------------------------------------------------------------------

    async def _release(self) -> None:
        """Close both sessions (release both caches); runs as its own task, so a cancelled caller's too."""

        async def close(session_close: Callable[[], Awaitable[None]]) -> None:
            try:
                await session_close()
            except Exception:  # noqa: BLE001 - closing must never mask the generation's outcome
                self.log.exception("closing a session failed")

        closes = []
        if self.draft_session is not None:
            closes.append(close(self._close_draft))
        if self.target_session is not None:
            closes.append(close(self._close_target))
        await asyncio.gather(*closes)  # both at once


def _check_proposal(proposal: Proposal, keep: int, appended: int, k: int) -> None:
    """DraftError unless the proposal is at most the k tokens (and their q rows) the round asked for. No q
    rows means a deterministic proposal (q one-hot at each token): exact under any sampling settings."""
    tokens: Sequence[int] = proposal.token_ids
    if len(tokens) > k or any(t < 0 for t in tokens):
        raise DraftError(f"draft returned {len(tokens)} tokens {list(tokens)[:16]}, expected at most {k} token ids")
    if proposal.q is not None and (proposal.q.dim() != 2 or proposal.q.shape[0] != len(tokens)):
        raise DraftError(f"draft returned q of shape {tuple(proposal.q.shape)}, expected [{len(tokens)}, V]")
    if proposal.cache_length != keep + appended:
        raise DraftError(f"draft cache length is {proposal.cache_length}, expected {keep + appended}")
