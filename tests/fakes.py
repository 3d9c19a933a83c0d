"""Scripted fakes of the orchestrator's dependencies, shared by every test of the loop and the servers.

The fake clients keep real caches (token lists) and compute logits from the cache *contents*, so any slip
in the loop's keep-length bookkeeping changes the output and the greedy-equivalence tests catch it. They
count calls and record every (sequence id, keep, append, n) they see, and can fail or stall on cue.
`serving` runs a real orchestrator server over them on 127.0.0.1 (port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from orchestrator.config import OrchestratorConfig
from orchestrator.generation import GenerationRequest, Round
from orchestrator.loop import SpeculativeLoop
from orchestrator.server import OrchestratorServer, create_server
from specdec import noise
from specdec.proposal import Proposal
from specdec.round_draws import draw_round
from specdec.sampling import SamplingParams, sample_by_gumbel, warp
from specdec.target_contract import Decode
from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2

V = 16


def asyncio_test(test: Callable) -> Callable:
    """Run an async test function in a fresh event loop (no pytest asyncio plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper

GREEDY = SamplingParams(temperature=0.0)
PROMPT = (3, 1, 4, 1, 5)


def target_logits(prefix: Sequence[int]) -> torch.Tensor:
    """A deterministic 'model': logits [V] of the next token given the whole prefix."""
    g = torch.Generator().manual_seed(hash(tuple(prefix)) & 0x7FFF_FFFF)
    return torch.randn(V, generator=g) * 3


def noisy_draft_logits(prefix: Sequence[int]) -> torch.Tensor:
    """A draft that mostly agrees with the target."""
    g = torch.Generator().manual_seed((hash(tuple(prefix)) * 31 + 7) & 0x7FFF_FFFF)
    return target_logits(prefix) + torch.randn(V, generator=g) * 1.5


def argmax_target(prefix: Sequence[int]) -> int:
    return int(torch.argmax(target_logits(prefix)))


# --- fakes ------------------------------------------------------------------------------------------------


class FakeClock:
    """A clock a test moves by hand (``clock.now += 61``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Calls:
    """What a fake client saw, shared by all its sessions."""

    opened: list[int] = field(default_factory=list)  # sequence ids
    requests: list[tuple] = field(default_factory=list)  # (sequence_id, keep, append, n)
    closed: list[int] = field(default_factory=list)  # sequence ids
    decodes: list[Decode] = field(default_factory=list)  # the settings of every decode asked of the target


class FakeTargetSession:
    def __init__(self, client: FakeTarget, sequence_id: int) -> None:
        self.client, self.sequence_id, self.cache = client, sequence_id, []
        self.forward_sequences = client.forward_sequences
        self.forward_tokens = 0

    async def score(
        self, keep_length: int, append_token_ids: Sequence[int], num_logits: int, params: SamplingParams
    ) -> torch.Tensor:
        client = self.client
        index = len(client.calls.requests)
        client.calls.requests.append((self.sequence_id, keep_length, list(append_token_ids), num_logits))
        if client.delay_s:
            await asyncio.sleep(client.delay_s)
        if index in client.fail_at:
            raise client.fail_at[index]
        assert self.sequence_id not in client.calls.closed, "score after close"
        assert keep_length <= len(self.cache), f"keep {keep_length} > cache {len(self.cache)}"
        assert (keep_length == 0) == (not self.cache or keep_length == 0)
        self.cache = self.cache[:keep_length] + list(append_token_ids)
        self.forward_tokens = len(append_token_ids) + self.forward_sequences - 1  # the others: a token each
        n = len(self.cache)
        logits = torch.stack([client.model(self.cache[: j + 1]) for j in range(n - num_logits, n)])  # [num_logits, V]
        return warp(logits, params)  # as the Triton model does

    async def decode(
        self, keep_length: int, append_token_ids: Sequence[int], params: SamplingParams, decode: Decode
    ) -> list[int]:
        """As the Triton model decodes: one score per token (each recorded as a request), the token drawn by
        the shared round rule at its position, fed in the next. (It ignores LOOKUP, which changes no greedy
        token: `tests/unit/test_target_steps.py` tests the model's lookups.)"""
        self.client.calls.decodes.append(decode)
        tokens: list[int] = []
        keep, append = keep_length, list(append_token_ids)
        while True:
            p = await self.score(keep, append, 1, params)
            keep += len(append)
            token = draw_round(
                [], None, p, seed=decode.seed, greedy=params.greedy, reproducible=decode.reproducible, first=keep
            ).tokens[0]
            tokens.append(token)
            if len(tokens) == decode.steps or token == decode.stop_token:
                return tokens
            append = [token]

    async def close(self) -> None:
        await asyncio.sleep(self.client.close_delay_s)
        self.client.calls.closed.append(self.sequence_id)


class FakeTarget:
    def __init__(
        self,
        model: Callable[[Sequence[int]], torch.Tensor] = target_logits,
        fail_at: dict[int, Exception] | None = None,
        delay_s: float = 0.0,
        close_delay_s: float = 0.0,
        forward_sequences: int = 1,
    ) -> None:
        self.model, self.fail_at, self.delay_s, self.close_delay_s = model, fail_at or {}, delay_s, close_delay_s
        self.forward_sequences = forward_sequences  # what every score says its forward ran
        self.calls = Calls()
        self.client_closed = 0

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> FakeTargetSession:
        self.calls.opened.append(sequence_id)
        return FakeTargetSession(self, sequence_id)

    async def close(self) -> None:
        self.client_closed += 1


class FakeDraftSession:
    replica = ""  # one draft, no replicas

    def __init__(self, client: FakeDraft, sequence_id: int) -> None:
        self.client, self.sequence_id, self.cache = client, sequence_id, []

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
        client = self.client
        index = len(client.calls.requests)
        client.calls.requests.append((self.sequence_id, keep_length, list(append_token_ids), num_draft_tokens))
        if client.delay_s:
            await asyncio.sleep(client.delay_s)
        if index in client.fail_at:
            raise client.fail_at[index]
        assert keep_length <= len(self.cache), f"keep {keep_length} > cache {len(self.cache)}"
        assert append_token_ids, "append must not be empty"
        self.cache = self.cache[:keep_length] + list(append_token_ids)
        drafts: list[int] = []
        rows = []
        purpose = noise.TOKEN if coupled else noise.DRAFT
        for i in range(num_draft_tokens):
            if client.policy is not None:  # a deterministic drafter; None ends its proposal early
                token = client.policy(self.cache + drafts, i)
                if token is None:
                    break
                drafts.append(token)
                continue
            q = warp(client.model(self.cache + drafts), params)  # [V]
            rows.append(q)
            position = len(self.cache) + i  # the draft's noise, as the real drafter derives it
            drafts.append(sample_by_gumbel(q, noise.gumbel(seed, position, purpose, q.shape[-1])))
        q_rows = None if params.greedy or not rows else torch.stack(rows)[:, : client.q_width]
        return Proposal(token_ids=tuple(drafts), q=q_rows, cache_length=len(self.cache))  # the context

    def can_move(self) -> bool:
        return False  # one draft, no replicas

    async def close(self) -> None:
        await asyncio.sleep(self.client.close_delay_s)
        self.client.calls.closed.append(self.sequence_id)


class FakeDraft:
    """A draft from a model (noisy target) or a policy(prefix, position) -> token | None (deterministic, q = None;
    None proposes fewer tokens)."""

    def __init__(
        self,
        model: Callable[[Sequence[int]], torch.Tensor] = noisy_draft_logits,
        policy: Callable[[list[int], int], int | None] | None = None,
        fail_at: dict[int, Exception] | None = None,
        delay_s: float = 0.0,
        q_width: int | None = None,
        close_delay_s: float = 0.0,
    ) -> None:
        self.model, self.policy, self.fail_at = model, policy, fail_at or {}
        self.delay_s, self.q_width, self.close_delay_s = delay_s, q_width, close_delay_s
        self.calls = Calls()
        self.offered: tuple[str, ...] = ("model", "ngram")

    async def open(self, sequence_id: int, *, timeout: float | None = None, avoid: str = "") -> FakeDraftSession:
        self.calls.opened.append(sequence_id)
        return FakeDraftSession(self, sequence_id)

    async def drafters(self) -> tuple[str, ...]:
        return self.offered

    async def close(self) -> None:
        pass


STUB_UNHEALTHY = "Stub process 'specdec_target_0_0' is not healthy."  # Triton's answer for a dead stub


class FakeTargetReplica(FakeTarget):
    """A FakeTarget as one replica of a pool, addressed ``address``. While ``down`` it refuses to open and
    fails its health checks, and its sessions' calls raise TargetConnectionLost (a broken stream); while
    not ``ready`` only its health checks fail. While ``stuck`` (a model that stopped answering behind a
    Triton that still reports itself ready) its sessions' calls and its answer checks never return; while
    ``stub_unhealthy`` they fail as Triton fails them for a dead or frozen model stub."""

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.address, self.down, self.ready, self.checks, self.abandoned = address, False, True, 0, []
        self.stuck, self.stub_unhealthy, self.answer_checks = False, False, 0

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> FakeTargetSession:
        from orchestrator.clients import TargetUnavailable

        if self.down:
            raise TargetUnavailable(f"target (Triton at {self.address}) is unavailable: down")
        self.calls.opened.append(sequence_id)
        return _ReplicaTargetSession(self, sequence_id)

    async def check_ready(self, timeout: float) -> None:
        from orchestrator.clients import TargetUnavailable

        self.checks += 1
        if self.down or not self.ready:
            raise TargetUnavailable(f"target (Triton at {self.address}) is unavailable: down")

    async def check_answers(self, timeout: float) -> None:
        from orchestrator.clients import TargetUnavailable

        self.answer_checks += 1
        while self.stuck:
            await asyncio.sleep(0.01)
        if self.stub_unhealthy:
            raise TargetUnavailable(f"target (Triton at {self.address}) is unavailable: {STUB_UNHEALTHY}")
        await self.check_ready(timeout)


class _ReplicaTargetSession(FakeTargetSession):
    async def score(self, keep_length, append_token_ids, num_logits, params):  # noqa: ANN001, ANN201
        await self._broken_or_stuck()
        return await super().score(keep_length, append_token_ids, num_logits, params)

    async def decode(self, keep_length, append_token_ids, params, decode):  # noqa: ANN001, ANN201
        await self._broken_or_stuck()
        return await super().decode(keep_length, append_token_ids, params, decode)

    async def _broken_or_stuck(self) -> None:
        from orchestrator.clients import TargetConnectionLost, TargetUnavailable

        if self.client.down:
            raise TargetConnectionLost(f"the stream to Triton at {self.client.address} broke")
        if self.client.stub_unhealthy:
            raise TargetUnavailable(f"target (Triton at {self.client.address}) is unavailable: {STUB_UNHEALTHY}")
        while self.client.stuck:
            await asyncio.sleep(0.01)

    def abandon(self, reason: str) -> None:
        self.client.abandoned.append((self.sequence_id, reason))


class FakeDraftReplica(FakeDraft):
    """A FakeDraft as one replica of a pool. While ``down`` its health checks fail and its sessions'
    calls raise DraftUnavailable (the draft's UNAVAILABLE status)."""

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.address, self.down, self.checks = address, False, 0

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> FakeDraftSession:
        self.calls.opened.append(sequence_id)
        return _ReplicaDraftSession(self, sequence_id)

    async def check_health(self, timeout: float) -> None:
        from orchestrator.clients import DraftUnavailable

        self.checks += 1
        if self.down:
            raise DraftUnavailable(f"draft at {self.address}: health check UNAVAILABLE")


class _ReplicaDraftSession(FakeDraftSession):
    async def propose(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        from orchestrator.clients import DraftUnavailable

        if self.client.down:
            raise DraftUnavailable(f"draft service UNAVAILABLE: {self.client.address} is down")
        return await super().propose(*args, **kwargs)


def fake_resolver(table: dict[str, list[str]]):
    """A resolver over ``table`` (name -> addresses; change it to move the replicas); a missing name fails."""

    async def resolver(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"{host}: name does not resolve")
        return list(table[host])

    return resolver


def agree_first(n: int) -> Callable[[list[int], int], int]:
    """A greedy draft policy: the target's argmax at positions < n of a round, a wrong token after."""

    def policy(prefix: list[int], i: int) -> int:
        best = argmax_target(prefix)
        return best if i < n else (best + 1) % V

    return policy


def ids() -> Callable[[], int]:
    counter = iter(range(100, 10**6))
    return lambda: next(counter)


def request(**overrides) -> GenerationRequest:
    values = dict(prompt_token_ids=PROMPT, params=GREEDY, seed=1234, max_new_tokens=12, num_draft_tokens=4)
    values.update(overrides)
    return GenerationRequest(**values)


async def run(loop: SpeculativeLoop, req: GenerationRequest) -> list[Round]:
    """A whole generation, then the release of its caches (which runs after it, in the background)."""
    try:
        return [r async for r in loop.generate(req)]
    finally:
        assert await loop.wait_released(5.0)


def output(rounds: list[Round]) -> list[int]:
    return [t for r in rounds for t in r.token_ids]


def greedy_reference(n: int, prompt: Sequence[int] = PROMPT, eos: int | None = None) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < n:
        t = argmax_target(tokens)
        if t == eos:
            break
        tokens.append(t)
        out.append(t)
    return out


# --- an orchestrator server over the fakes, with the real tokenizer ---------------------------------------

VOCAB = 49152
EOS = 2
CONTEXT = 64


def big_target(prefix: Sequence[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(tuple(prefix)) & 0x7FFF_FFFF)
    logits = torch.randn(VOCAB, generator=g) * 4
    logits[EOS] = -math.inf
    return logits


def big_draft(prefix: Sequence[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed((hash(tuple(prefix)) * 31 + 7) & 0x7FFF_FFFF)
    return big_target(prefix) + torch.randn(VOCAB, generator=g)


def eos_after(n: int):
    def model(prefix: Sequence[int]) -> torch.Tensor:
        logits = big_target(prefix)
        if len(prefix) >= n:
            logits[EOS] = 100.0
        return logits

    return model


@dataclass
class Running:
    stub: generation_pb2_grpc.GenerationServiceStub
    channel: grpc.aio.Channel
    target: FakeTarget
    draft: FakeDraft
    server: OrchestratorServer


def metric_value(running: Running, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric's current value in the server's registry (0 when the series does not exist yet)."""
    value = running.server.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def serving(tokenizer, target=None, draft=None, **config_fields) -> AsyncIterator[Running]:
    target = target or FakeTarget(model=big_target)
    draft = draft or FakeDraft(model=big_draft)
    config_fields.setdefault("default_num_draft_tokens", "4")  # a fixed K unless a test asks for auto
    config = OrchestratorConfig(port=0, context_length=CONTEXT, **config_fields)
    server, port = await create_server(config, draft_client=draft, target_client=target, tokenizer=tokenizer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
    try:
        yield Running(generation_pb2_grpc.GenerationServiceStub(channel), channel, target, draft, server)
    finally:
        await channel.close()
        await server.stop(None)
    if isinstance(target, FakeTarget):
        assert target.client_closed == 1  # the server's stop closes the clients


def req(**fields) -> generation_pb2.GenerateRequest:
    sampling = fields.pop("sampling", {})
    fields.setdefault("prompt", "Once upon a time")
    return generation_pb2.GenerateRequest(sampling=sampling_pb2.SamplingParams(**sampling), **fields)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``condition`` on the event loop until it holds (AssertionError after ``timeout_s``)."""
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached within {timeout_s} s")


# --- seeded random rows ---------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [gen(base + i) for i in range(n)]


def random_logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


def random_probs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(random_logits(*shape, seed=seed), dim=-1)


def tiny_llama(vocab_size: int = 64, max_positions: int = 128, seed: int = 0) -> torch.nn.Module:
    """An in-memory random Llama (2 layers, hidden 32), for tests of the engine and the target model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()
