"""The target model inside the REAL Triton server (from the nvidia-pytriton wheel), with the real SmolLM2.

One Triton for the module, started by ``target_service.launcher`` on 127.0.0.1 with free ports. The
checks are what the orchestrator relies on: Triton's logits equal an in-process forward of the same
weights (start, append, rollback), a release empties the cache (the live-sequences metric), a lost
sequence and bad input come back as messages a client can tell apart (``specdec.target_contract``) over
gRPC streams (the model is decoupled: Triton refuses unary calls to it), and concurrent sequences do not
disturb each other. No skips: if Triton cannot start, these tests fail.
"""

from __future__ import annotations

import asyncio
import queue
import re
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from orchestrator.target_triton import TritonTargetClient
from specdec import target_contract as contract
from specdec.models import load_model
from specdec.round_draws import draw_round
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams, warp
from target_service.config import TargetModelParams, TritonServerConfig
from target_service.launcher import TritonServer
from target_service.liveness import infer_inputs
from tests.integration.live import frozen_objects, wait_until

pytestmark = pytest.mark.integration

MAX_SEQUENCES = 4
ATOL = 1e-3
PROMPT = [1, 9690, 314, 253, 1789, 33, 2, 28]  # arbitrary in-vocabulary ids
DRAFTS = [30, 4, 1215, 11]
# One torch thread on both sides: on a small, busy CPU two OpenMP threads per process collapse under
# contention (5-20x slower); correctness is what is tested here, not speed.
THREADS = 1


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    config = TritonServerConfig(
        grpc_port=0, http_port=0, metrics_port=0, ready_timeout_s=240.0,
        params=TargetModelParams(model="smollm2", max_sequences=MAX_SEQUENCES, threads=THREADS),
    )
    with TritonServer(config) as server:
        yield server


@dataclass(frozen=True)
class Target:
    url: str
    admin: grpcclient.InferenceServerClient  # health, metadata: everything but inference


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> Iterator[Target]:
    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        yield Target(triton.grpc_url, c)


class Reference:
    """The same weights in-process, without a cache; remembers forwards (a prefix is a slice of them)."""

    def __init__(self) -> None:
        self.model = load_model("smollm2")
        self._done: dict[tuple[int, ...], np.ndarray] = {}

    @torch.inference_mode()
    def __call__(self, ids: list[int]) -> np.ndarray:
        """Logits of every position of ``ids``: [T, V]."""
        key = tuple(ids)
        for done, logits in self._done.items():
            if done[: len(key)] == key:
                return logits[: len(key)]
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        finally:
            torch.set_num_threads(threads)
        self._done[key] = logits
        return logits


@pytest.fixture(scope="module")
def forward() -> Reference:
    return Reference()


def new_sid() -> int:
    return secrets.randbits(63) | 1


def inputs(ids: list[int], keep: int, n: int) -> list[grpcclient.InferInput]:
    return infer_inputs([
        (contract.INPUT_IDS, np.array(ids, dtype=np.int32).reshape(1, len(ids))),  # [1, T]
        (contract.KEEP_LENGTH, np.array([[keep]], dtype=np.int32)),  # [1, 1]
        (contract.NUM_LOGITS, np.array([[n]], dtype=np.int32)),  # [1, 1]
    ])


def infer(client: Target, sid: int, ids: list[int], keep: int, n: int, *, start: bool = False,
          end: bool = False) -> np.ndarray:
    """One target step on a stream of its own (a sequence is Triton's correlation id, whatever the stream);
    returns LOGITS [1, n, V], or raises the stream's error."""
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(client.url) as streamer:
        streamer.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            streamer.async_stream_infer(contract.MODEL_NAME, inputs(ids, keep, n), sequence_id=sid,
                                        sequence_start=start, sequence_end=end)
            result, error = answers.get(timeout=120)
        finally:
            streamer.stop_stream()
    if error is not None:
        raise error
    logits = result.as_numpy(contract.LOGITS)
    assert logits.dtype == np.float32
    return logits


def release(client: Target, sid: int) -> None:
    """A release request; START as well, so it succeeds whether or not Triton still knows the sequence."""
    logits = infer(client, sid, [], 0, 0, start=True, end=True)
    assert logits.shape[:2] == (1, 0)


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def metric_sum(triton: TritonServer, name: str, label: str = "") -> float:
    """A metric of the model, summed over its labels, or those that carry ``label`` (``kind="reused"``); it
    must be exported."""
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    values = re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
    values = [value for labels, value in values if label in labels]
    assert values, f"{name} not exported on {triton.metrics_url}"
    return sum(float(v) for v in values)


def live_sequences(triton: TritonServer) -> float:
    return metric_sum(triton, contract.METRIC_LIVE_SEQUENCES)


def assert_live(triton: TritonServer, expected: int) -> None:
    """The gauge reaches ``expected``: the model updates its metrics just after a batch's answers went out."""
    wait_until(lambda: live_sequences(triton) == expected, f"{expected} live sequence(s)", timeout_s=5.0)


def test_the_model_process_freezes_what_startup_left(triton):
    """The stub process holds torch and the model (specdec.gc_freeze): frozen once, after loading."""
    assert triton.log_path is not None
    assert frozen_objects(triton.log_path.read_text(errors="replace")) > 100_000


def test_start_matches_an_in_process_forward(client, forward):
    forward(PROMPT + DRAFTS)  # one forward serves the prefixes compared below and in later tests
    sid = new_sid()
    logits = infer(client, sid, PROMPT, 0, 3, start=True)
    assert logits.shape == (1, 3, 49152)
    np.testing.assert_allclose(logits[0], forward(PROMPT)[-3:], atol=ATOL)
    release(client, sid)


def test_a_prompt_over_the_forward_budget_is_prefilled_in_chunks_and_matches_one_forward(client, forward, triton):
    budget = TargetModelParams().max_forward_tokens
    ids = [(37 * i + 11) % 49152 for i in range(budget + 44)]
    before = metric_sum(triton, contract.METRIC_FORWARDS)
    logits = infer(client, new_sid(), ids, 0, 2, start=True, end=True)
    np.testing.assert_allclose(logits[0], forward(ids)[-2:], atol=ATOL)
    wait_until(lambda: metric_sum(triton, contract.METRIC_FORWARDS) == before + 2,
               "two forwards: the budget's tokens, then the rest", timeout_s=5.0)
    assert_live(triton, 0)


def test_prompts_that_share_a_head_start_from_it_and_match_one_forward(client, forward, triton):
    """The model's prefix cache (on by default): two different prompts share a 24-token head, so it is kept,
    and a third prompt's prefill copies it in and runs the rest; its rows are a full forward's."""
    head = [(53 * i + 7) % 49152 for i in range(24)]
    prompts = [head + [(97 * i + tail) % 49152 for i in range(6)] for tail in (1, 2, 3)]
    reused = metric_sum(triton, contract.METRIC_PROMPT_TOKENS, 'kind="reused"')
    for ids in prompts[:2]:
        infer(client, new_sid(), ids, 0, 1, start=True, end=True)
    logits = infer(client, new_sid(), prompts[2], 0, 2, start=True, end=True)
    np.testing.assert_allclose(logits[0], forward(prompts[2])[-2:], atol=ATOL)
    wait_until(lambda: metric_sum(triton, contract.METRIC_PROMPT_TOKENS, 'kind="reused"') == reused + 24,
               "the third prompt's 24 head tokens reused", timeout_s=5.0)
    assert metric_sum(triton, contract.METRIC_PREFIX_BYTES) > 0
    assert_live(triton, 0)


def test_a_release_right_behind_a_long_prompt_cancels_the_rest_of_its_prefill(triton):
    """A generation cancelled mid-prompt: the orchestrator sends the release on the stream right behind the
    START. The prompt's first chunk is under way when the release arrives; its other chunks never run."""
    budget = TargetModelParams().max_forward_tokens
    ids = [(37 * i + 11) % 49152 for i in range(4 * budget)]  # four forwards' worth
    sid = new_sid()
    forwards = metric_sum(triton, contract.METRIC_FORWARDS)

    async def session() -> list[tuple]:
        steps = [(ids, 1, True, False), ([], 0, False, True)]  # the prompt, then the release behind it

        async def requests():
            for tokens, n, start, end in steps:
                yield {"model_name": contract.MODEL_NAME, "inputs": inputs(tokens, 0, n), "sequence_id": sid,
                       "sequence_start": start, "sequence_end": end}

        async with grpcaio.InferenceServerClient(triton.grpc_url) as aio:
            stream = aio.stream_infer(requests())
            return [await asyncio.wait_for(stream.__anext__(), timeout=60) for _ in steps]

    (r0, e0), (r1, e1) = asyncio.run(session())
    assert r0 is None and "released before this request ran" in e0.message()
    assert e1 is None and r1.as_numpy(contract.LOGITS).shape == (1, 0, 49152)

    def cancelled() -> float:  # the label appears with its first request
        try:
            return metric_sum(triton, contract.METRIC_REQUESTS, 'code="CANCELLED"')
        except AssertionError:
            return 0.0

    wait_until(lambda: cancelled() == 1, "the prompt counted as cancelled", timeout_s=5.0)
    assert metric_sum(triton, contract.METRIC_FORWARDS) < forwards + 4  # not every chunk ran
    assert_live(triton, 0)


def test_append_and_rollback_match_a_fresh_sequence(client, forward):
    sid, fresh = new_sid(), new_sid()
    infer(client, sid, PROMPT, 0, 1, start=True)
    verified = infer(client, sid, DRAFTS, len(PROMPT), len(DRAFTS))  # K drafts, their K rows
    np.testing.assert_allclose(verified[0], forward(PROMPT + DRAFTS)[-len(DRAFTS) :], atol=ATOL)
    # Two drafts accepted, then a new token: the cache is rolled back, not recomputed.
    rolled = infer(client, sid, [42], len(PROMPT) + 2, 1)
    from_scratch = infer(client, fresh, PROMPT + DRAFTS[:2] + [42], 0, 1, start=True, end=True)
    np.testing.assert_allclose(rolled, from_scratch, atol=ATOL)
    np.testing.assert_allclose(rolled[0], forward(PROMPT + DRAFTS[:2] + [42])[-1:], atol=ATOL)
    release(client, sid)


def test_release_brings_live_sequences_back_to_zero(client, triton):
    assert_live(triton, 0)
    sids = [new_sid(), new_sid()]
    for sid in sids:
        infer(client, sid, PROMPT[:2], 0, 1, start=True)
    assert_live(triton, 2)
    released = infer(client, sids[0], [], 0, 0, end=True)  # the release request of the contract
    assert released.shape == (1, 0, 49152)
    assert_live(triton, 1)
    infer(client, sids[1], [5], 2, 1, end=True)  # END on a normal request: logits, then dropped
    assert_live(triton, 0)


def test_a_lost_sequence_is_recognisable(client):
    # Triton never saw this sequence (or restarted, or ENDed it): its sequence batcher refuses it.
    error = refused(infer, client, new_sid(), [1, 2], 3, 1)
    assert error.status() is None  # a stream response carries only the message
    assert contract.TRITON_NO_START in error.message()
    assert contract.classify_error(error.status(), error.message()) is contract.ErrorKind.SEQUENCE_LOST
    # Triton knows the sequence but the model holds no cache for it (here: its START was refused).
    sid = new_sid()
    refused(infer, client, sid, [10**6], 0, 1, start=True)
    error = refused(infer, client, sid, [1, 2], 0, 1)
    assert error.message().startswith(contract.NOT_FOUND_PREFIX)
    assert "sequence" in error.message() and "no cache" in error.message()
    assert contract.classify_error(error.status(), error.message()) is contract.ErrorKind.SEQUENCE_LOST
    release(client, sid)


def test_bad_input_is_invalid_argument_and_the_server_stays_up(client, forward):
    sid = new_sid()
    infer(client, sid, PROMPT, 0, 1, start=True)
    for ids, keep, needle in (([49152], len(PROMPT), "vocabulary"), ([5], len(PROMPT) + 1, "cached length")):
        error = refused(infer, client, sid, ids, keep, 1)
        assert error.message().startswith(contract.INVALID_PREFIX), error
        assert needle in error.message()
        assert contract.classify_error(error.status(), error.message()) is contract.ErrorKind.INVALID_ARGUMENT
    assert client.admin.is_server_live() and client.admin.is_model_ready(contract.MODEL_NAME)
    logits = infer(client, sid, DRAFTS[:1], len(PROMPT), 1)  # the cache survived the refused requests
    np.testing.assert_allclose(logits[0], forward(PROMPT + DRAFTS[:1])[-1:], atol=ATOL)
    release(client, sid)


def test_capacity_is_unavailable_with_a_capacity_message(client, triton):
    sids = [new_sid() for _ in range(MAX_SEQUENCES + 1)]
    for sid in sids[:-1]:
        infer(client, sid, [1], 0, 1, start=True)
    error = refused(infer, client, sids[-1], [1], 0, 1, start=True)
    assert error.message().startswith(contract.CAPACITY_PREFIX)
    assert contract.classify_error(error.status(), error.message()) is contract.ErrorKind.CAPACITY
    for sid in sids:
        release(client, sid)
    assert_live(triton, 0)


def test_unary_calls_are_refused_the_model_answers_on_streams(client):
    """Decoupled: the model answers through response senders, which only a stream carries."""
    error = refused(client.admin.infer, contract.MODEL_NAME, inputs([1], 0, 1), sequence_id=new_sid(),
                    sequence_start=True, sequence_end=True)
    assert "decoupled" in error.message()


def test_interleaved_sequences_do_not_disturb_each_other(client, forward):
    prompts = [PROMPT, PROMPT[::-1], [17, 2000, 9, 9, 9]]
    sids = [new_sid() for _ in prompts]

    def run(i: int) -> tuple[np.ndarray, np.ndarray]:
        sid, ids = sids[i], prompts[i] + DRAFTS[: i + 1]
        verified = infer(client, sid, ids, 0, i + 2, start=True)  # prompt + i+1 drafts, i+2 rows
        rolled = infer(client, sid, [100 + i], len(ids) - 1, 1, end=True)  # reject the last draft
        return verified, rolled

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: Triton may batch them in one execute()
        results = list(pool.map(run, range(len(prompts))))
    for i, (verified, rolled) in enumerate(results):
        ids = prompts[i] + DRAFTS[: i + 1]
        np.testing.assert_allclose(verified[0], forward(ids)[-(i + 2) :], atol=ATOL)
        np.testing.assert_allclose(rolled[0], forward(ids[:-1] + [100 + i])[-1:], atol=ATOL)


def test_stream_infer_over_grpc_aio(triton, forward):
    sid = new_sid()

    def request(ids: list[int], keep: int, n: int, start: bool = False, end: bool = False) -> dict:
        return {
            "model_name": contract.MODEL_NAME,
            "inputs": inputs(ids, keep, n),
            "sequence_id": sid,
            "sequence_start": start,
            "sequence_end": end,
        }

    steps = [
        request(PROMPT, 0, 2, start=True),
        request(DRAFTS, len(PROMPT), 1),
        request([3], len(PROMPT) + 99, 1),  # keep_length > cached: an error on the open stream
        request([42], len(PROMPT) + 2, 1),  # the stream and the cache carry on (rollback)
        request([], 0, 0, end=True),  # release
    ]

    async def session() -> list[tuple]:
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await queue.get()) is not None:
                yield item

        async with grpcaio.InferenceServerClient(triton.grpc_url) as client:
            stream = client.stream_infer(requests())
            answers = []
            for step in steps:
                await queue.put(step)
                answers.append(await asyncio.wait_for(stream.__anext__(), timeout=60))
            await queue.put(None)
            return answers

    (r0, e0), (r1, e1), (r2, e2), (r3, e3), (r4, e4) = asyncio.run(session())
    assert e0 is None and e1 is None and e3 is None and e4 is None
    np.testing.assert_allclose(r0.as_numpy(contract.LOGITS)[0], forward(PROMPT)[-2:], atol=ATOL)
    np.testing.assert_allclose(r1.as_numpy(contract.LOGITS)[0], forward(PROMPT + DRAFTS)[-1:], atol=ATOL)
    assert r2 is None and e2 is not None
    assert e2.status() is None  # a stream response carries only the message
    assert e2.message().startswith(contract.INVALID_PREFIX) and "exceeds the cached length" in e2.message()
    assert contract.classify_error(e2.status(), e2.message()) is contract.ErrorKind.INVALID_ARGUMENT
    np.testing.assert_allclose(r3.as_numpy(contract.LOGITS)[0], forward(PROMPT + DRAFTS[:2] + [42])[-1:], atol=ATOL)
    assert r4.as_numpy(contract.LOGITS).shape == (1, 0, 49152)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=0.7, top_k=50)],
    ids=["greedy", "top-p", "top-k"],
)
def test_the_orchestrators_adapter_gets_the_warped_rows_packed(triton, client, params):
    # Through the orchestrator's real adapter: PROBS must be warp(LOGITS) of the same step, bit for bit,
    # while only each row's support crosses the contract.
    plain = new_sid()
    logits = infer(client, plain, PROMPT + DRAFTS, 0, len(DRAFTS) + 1, start=True, end=True)  # [1, K+1, V]
    expected = warp(torch.from_numpy(np.array(logits[0])), params)  # [K+1, V]

    async def score() -> PackedRows:
        target = TritonTargetClient(triton.grpc_url)
        try:
            session = await target.open(new_sid(), timeout=60.0)
            try:
                return await session.score(0, PROMPT + DRAFTS, len(DRAFTS) + 1, params)
            finally:
                await session.close()
        finally:
            await target.close()

    p = asyncio.run(score())  # PackedRows [K+1, W]: W covers every token with non-zero probability
    support = int(torch.count_nonzero(expected, dim=-1).max())
    assert support < 49152 / 2 and p.shape[1] <= 49152
    assert torch.equal(torch.nn.functional.pad(p.dense(), (0, 49152 - p.shape[1])), expected)
    assert_live(triton, 0)  # the adapter released its sequence


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_decode_through_the_adapter_gives_the_tokens_drawn_from_scored_rows(triton, client, reproducible):
    # The real Triton decodes 6 tokens in one request (one forward each, through its scheduler); the orchestrator
    # would draw the same tokens from the rows of 6 scored steps with the same rule and seed.
    params, seed, steps = SamplingParams(temperature=0.9, top_p=0.95), 2**63 + 17, 6

    async def both() -> tuple[list[int], list[int]]:
        target = TritonTargetClient(triton.grpc_url)
        try:
            scored: list[int] = []
            session = await target.open(new_sid(), timeout=60.0)
            try:
                keep, append = 0, list(PROMPT)
                while len(scored) < steps:
                    p = await session.score(keep, append, 1, params)
                    keep += len(append)
                    scored.append(draw_round([], None, p, seed=seed, greedy=False, reproducible=reproducible,
                                             first=keep).tokens[0])
                    append = scored[-1:]
            finally:
                await session.close()
            session = await target.open(new_sid(), timeout=60.0)
            try:
                decoded = await session.decode(0, PROMPT, params, contract.Decode(steps, seed, reproducible))
                assert session.forward_sequences == 1
            finally:
                await session.close()
            return scored, decoded
        finally:
            await target.close()

    scored, decoded = asyncio.run(both())
    assert decoded == scored
    assert_live(triton, 0)


def test_a_model_that_cannot_load_fails_the_start_loudly(tmp_path):
    server = TritonServer(TritonServerConfig(
        grpc_port=0, http_port=0, metrics_port=0, params=TargetModelParams(model=str(tmp_path / "no-model"), threads=THREADS),
    ))
    with pytest.raises(RuntimeError, match="has no config.json") as info:
        server.start()
    assert "tail of the Triton log" in str(info.value)
    assert not server.is_running() and server.pid is None


def test_the_service_command_says_why_it_cannot_start_and_exits_1(tmp_path):
    missing = tmp_path / "no-model"
    done = subprocess.run(  # noqa: S603 - ours
        [sys.executable, "-m", "target_service", "--model", str(missing), "--threads", str(THREADS),
         *[f"--{name}-port=0" for name in ("grpc", "http", "metrics")]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "ERROR target_service: cannot start: tritonserver exited with 1 before it was ready" in done.stderr
    assert f"model folder {missing} has no config.json" in done.stderr and "Traceback" not in done.stderr
