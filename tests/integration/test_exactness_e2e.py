"""Exactness where it runs: thousands of generations through the real stack, tested against the exact target.

Why it exists: the sampler's own statistical tests hold the math to account; only samples drawn through the
public gRPC API also test what surrounds it: the packing of rows on both wires, the target's warping next
to the model in Triton, the draft hop, the loop's bookkeeping, K changing between rounds (auto), the
per-position noise and the coupled mode.

The target is a tiny random Llama with a vocabulary of 6, so the exact joint distribution of the first L
generated tokens (6^L sequences) is computed in-process from the same weights; the draft is its first layer
(a model draft that disagrees with the target), or prompt lookup and suffix drafting. The prompt is the
target's own greedy text, which repeats itself (a tiny model loops), so the lookups find what the target
is likely to say.
Each case draws N generations and runs G-tests (`tests/statistical/gtest.py`) of the joint of the first L
tokens and of each position's marginal. The negative control runs the same requests through an orchestrator
built from the same code with one thing changed, its round rule (accept every draft: a test-only argument
of ``create_server``), against the same Triton and draft service; the same tests must reject it. A smaller
run on SmolLM2 checks the first two tokens under top-k.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch

from cli.stack import LocalStack
from orchestrator.config import OrchestratorConfig
from orchestrator.server import create_server
from specdec.models import load_model, load_tokenizer
from specdec.rows import PackedRows
from specdec.sampling import RejectionResult, SamplingParams, warp
from specdec.tiny import save_tiny_llama
from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.integration.live import tiny_stack_config
from tests.statistical.gtest import P_THRESHOLD, GTest, g_test, joint_test, report

pytestmark = [pytest.mark.integration, pytest.mark.statistical]

V = 6
N = 2400
CALLERS = 16
WARPS = {
    "temperature0.9": SamplingParams(temperature=0.9),
    "top_k3": SamplingParams(top_k=3),
    "top_p0.8": SamplingParams(top_p=0.8),
}


@dataclass(frozen=True)
class Tiny:
    stack: LocalStack
    model: torch.nn.Module
    prompt: list[int]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tiny]:
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-v6"), seed=3, vocab_size=V, with_tokenizer=True)
    model = load_model(str(folder))
    with torch.inference_mode():
        prompt = model.generate(torch.tensor([[1, 2]]), max_new_tokens=10, do_sample=False)[0].tolist()
    config = tiny_stack_config(folder, tmp_path_factory.mktemp("exact-logs"), draft_layers="0",
                               drafters="model,ngram,suffix")
    env = {"SPECDEC_ORCHESTRATOR_DRAFT_ROUND_TIMEOUT_S": "0"}  # never a fallback round: drafts every time
    with LocalStack(config, env=env) as stack:
        yield Tiny(stack, model, prompt)


@torch.inference_mode()
def exact_joint(model: torch.nn.Module, prompt: list[int], params: SamplingParams, length: int) -> np.ndarray:
    """[V]*length: P(y_1..y_length | prompt) of the target warped by ``params``, every sequence enumerated."""
    sequences = torch.tensor(list(itertools.product(range(V), repeat=length)))  # [V^L, L]
    ids = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences], dim=1)
    logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1].float()  # [V^L, L, V]: the rows of y_1..y_L
    probs = warp(logits, params).double()  # [V^L, L, V]
    chosen = probs.gather(-1, sequences.unsqueeze(-1)).squeeze(-1)  # [V^L, L]
    return chosen.prod(-1).numpy().reshape((V,) * length)


def draw(address: str, prompt: list[int], params: SamplingParams, k: int | None, drafter: str, reproducible: bool,
         length: int, n: int = N, callers: int = CALLERS) -> tuple[np.ndarray, list[generation_pb2.GenerationStats]]:
    """n generations of ``length`` tokens through GenerationService, ``callers`` at a time: tokens [n, length]
    and their stats."""
    sampling = sampling_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=prompt, max_new_tokens=length, sampling=sampling, drafter=drafter, reproducible=reproducible,
    )  # no seed: each generation draws its own 64-bit seed
    if k is not None:
        request.num_draft_tokens = k
    local = threading.local()

    def one(_: int) -> generation_pb2.GenerateResponse:
        if not hasattr(local, "stub"):
            local.channel = grpc.insecure_channel(address)
            local.stub = generation_pb2_grpc.GenerationServiceStub(local.channel)
        return local.stub.Generate(request, timeout=120)

    with ThreadPoolExecutor(callers) as pool:
        responses = list(pool.map(one, range(n)))
    tokens = np.array([list(r.token_ids) for r in responses])
    assert tokens.shape == (n, length), "every generation runs to its length (the vocabulary has no EOS)"
    return tokens, [r.stats for r in responses]


def g_tests_of(tokens: np.ndarray, joint: np.ndarray) -> list[GTest]:
    """The joint of all positions, and each position's marginal."""
    tests = [joint_test("joint", tokens, joint)]
    for j in range(tokens.shape[1]):
        marginal = joint.sum(axis=tuple(a for a in range(joint.ndim) if a != j))
        tests.append(g_test(f"y{j + 1}", np.bincount(tokens[:, j], minlength=V), marginal, [str(t) for t in range(V)]))
    return tests


CASES = [  # (drafter, warp, K (None = auto: `draw_with_auto`), coupled)
    ("model", "temperature0.9", 3, False),
    ("model", "top_k3", 1, False),
    ("ngram", "temperature0.9", 3, False),
    ("suffix", "top_p0.8", 3, False),
    ("suffix", "temperature0.9", None, False),
    ("model", "temperature0.9", 3, True),
    ("suffix", "top_p0.8", None, True),
]


@pytest.mark.parametrize(("drafter", "warp_name", "k", "coupled"), CASES)
def test_generations_through_the_stack_follow_the_exact_target(tiny, drafter, warp_name, k, coupled) -> None:
    params, length = WARPS[warp_name], (k or 3) + 1
    if k is None:
        tokens, stats = draw_with_auto(tiny, params, drafter, coupled, length)
    else:
        tokens, stats = draw(tiny.stack.address, tiny.prompt, params, k, drafter, coupled, length)
    tests = g_tests_of(tokens, exact_joint(tiny.model, tiny.prompt, params, length))
    drafted = sum(s.drafted_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    by_k = np.sum([list(s.rounds_by_k) for s in stats], axis=0)
    label = (f"{drafter} {warp_name} K={'auto' if k is None else k} {'coupled' if coupled else 'rejection'}: "
             f"drafted {drafted}, accepted {accepted}, rounds by K {by_k.tolist()}")
    text = report(label, tests)
    assert all(t.pvalue >= P_THRESHOLD for t in tests), text
    assert accepted > 0 and accepted < drafted, "the case must exercise both acceptance and rejection"
    assert all(s.reproducible == coupled and not s.draft_fallback_rounds for s in stats)
    if k is None:  # auto: K changed between rounds
        assert np.count_nonzero(by_k) >= 2, f"auto ran a single K: {by_k.tolist()}"


def with_orchestrator(stack, work, sample_round=None, **settings):  # noqa: ANN001, ANN201
    """``work(address)`` against an orchestrator of our own on the stack's Triton and draft service
    (``settings`` over the defaults; ``sample_round`` replaces the round rule), run in a thread while it
    serves."""
    config = OrchestratorConfig(port=0, draft_address=stack.draft_address, triton_url=stack.triton_url,
                                tokenizer=stack.config.target_model, **settings)
    rule = {} if sample_round is None else {"sample_round": sample_round}

    async def serve() -> object:
        server, port = await create_server(config, tokenizer=load_tokenizer(stack.config.target_model), **rule)
        try:
            return await asyncio.to_thread(work, f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    return asyncio.run(serve())


def draw_with_auto(tiny, params: SamplingParams, drafter: str, coupled: bool, length: int):  # noqa: ANN001, ANN201
    """Auto K's generations, with Ks that change between rounds. With the tiny model a draft call costs more
    than a target round, so auto rightly keeps speculation off and only probes; here it runs one token per
    target round without the target's lookups, and probes every 9 rounds off (counted over all
    generations: each is 4 rounds), whatever a probe costs. The drafter first sees the text at a fixed K,
    as traffic would have shown it (a lookup drafter learns from the rounds it drafts)."""
    def work(address: str):  # noqa: ANN202
        draw(address, tiny.prompt, params, 3, drafter, coupled, length, n=N // 8)
        return draw(address, tiny.prompt, params, None, drafter, coupled, length, callers=1)

    return with_orchestrator(tiny.stack, work, target_steps=1, target_lookup=0, k_probe_rounds=4,
                             k_probe_rounds_max=8, k_probe_budget=1.0)


def always_accept(drafts, q, p, request, first) -> RejectionResult:  # noqa: ANN001
    """The negative control's round rule: every draft accepted, then the target's own draw after them."""
    rows = p.dense() if isinstance(p, PackedRows) else p  # [K+1, V]
    bonus = int(torch.multinomial(rows[len(drafts)], 1))
    return RejectionResult(accepted=len(drafts), tokens=[*drafts, bonus])


def test_the_negative_control_through_the_same_stack_is_rejected(tiny) -> None:
    params, k = WARPS["temperature0.9"], 3
    tokens = with_orchestrator(
        tiny.stack, lambda address: draw(address, tiny.prompt, params, k, "model", False, k + 1, n=N // 2)[0],
        sample_round=always_accept, draft_round_timeout_s=0,
    )
    tests = g_tests_of(tokens, exact_joint(tiny.model, tiny.prompt, params, k + 1))
    text = report("negative control (accept every draft) through the stack", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text


def test_smollm2_first_two_tokens_under_top_k_follow_the_target(stack) -> None:
    """The real pair, fewer samples: the first two tokens under top-k 3 (9 possible pairs)."""
    prompt = load_tokenizer("smollm2")("The capital of France is")["input_ids"]
    params = SamplingParams(temperature=1.0, top_k=3)
    sampling = sampling_pb2.SamplingParams(temperature=1.0, top_k=3)
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=prompt, max_new_tokens=2, num_draft_tokens=1, drafter="model", sampling=sampling,
    )
    with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(4) as pool:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        responses = list(pool.map(lambda _: stub.Generate(request, timeout=120), range(240)))
    pairs = [tuple(r.token_ids) for r in responses]
    model = load_model("smollm2")
    with torch.inference_mode():
        first = warp(model(torch.tensor([prompt])).logits[0, -1].float(), params)  # [V]
        support = torch.nonzero(first).flatten().tolist()
        cells, probs = [], []
        for a in support:
            second = warp(model(torch.tensor([prompt + [a]])).logits[0, -1].float(), params)
            for b in torch.nonzero(second).flatten().tolist():
                cells.append((a, b))
                probs.append(float(first[a]) * float(second[b]))
    counts = np.array([pairs.count(c) for c in cells] + [sum(p not in cells for p in pairs)])
    test = g_test("(y1,y2)", counts, np.array(probs + [0.0]), [str(c) for c in cells] + ["other"])
    text = report("SmolLM2 top-k 3, model draft K=1", [test])
    assert test.pvalue >= P_THRESHOLD, text


def test_a_seed_reproduces_its_text_whatever_k_drafter_load_or_a_dead_draft(tiny) -> None:
    """The coupled mode's promise (on by default with a seed), through the stack: the same tokens under
    K = 0, 1, 4 and auto, every drafter, 8 requests at once, and a draft service killed mid-generation."""
    stack = tiny.stack
    sampling = sampling_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=2**63 + 12345)

    def request(k: int | None, drafter: str = "model") -> generation_pb2.GenerateRequest:
        r = generation_pb2.GenerateRequest(prompt_token_ids=tiny.prompt, max_new_tokens=48, sampling=sampling,
                                           drafter=drafter)
        if k is not None:
            r.num_draft_tokens = k
        return r

    with grpc.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reference = stub.Generate(request(0), timeout=120)
        assert reference.stats.reproducible and reference.stats.seed == 2**63 + 12345
        for drafter in ("model", "ngram", "suffix"):
            for k in (1, 4, None):
                got = stub.Generate(request(k, drafter), timeout=120)
                assert list(got.token_ids) == list(reference.token_ids), f"{drafter} K={k}"
        with ThreadPoolExecutor(8) as pool:  # eight at once: batched with each other in Triton and the draft
            together = list(pool.map(lambda i: stub.Generate(request(4 if i % 2 else None), timeout=120), range(8)))
        assert all(list(r.token_ids) == list(reference.token_ids) for r in together)
        # The draft service dies after the first round: the rest runs target-only, the text does not change.
        chunks = stub.GenerateStream(request(4), timeout=120)
        streamed = list(next(chunks).token_ids)
        stack.kill("draft")
        try:
            for chunk in chunks:
                streamed += list(chunk.token_ids)
                last = chunk
            assert last.stats.draft_fallback_rounds > 0
            assert streamed == list(reference.token_ids)
        finally:
            stack.restart("draft")
