"""Statistical test: a decode that verifies looked-up drafts next to the target still samples the target.

Why this file exists: with LOOKUP, each forward of a target-side decode (`target_service.steps`) feeds a
draft found in the sequence's own tokens (`specdec.lookup`) and keeps what the round rule accepts. The
rule is the one `test_sampling_distribution.py` tests, but here its inputs are assembled by the target
model (which rows score which draft, where the next forward starts, how the noise is keyed), so the claim
is tested where it is made: many seeded decodes of a tiny Llama through `run_to_completion`, G-tests of
the three tokens' joint distribution against the exact one (computed by full forwards), and a negative
control (on a rejection, drawing from p instead of the residual) that the same test must reject.

The model is a tiny random Llama whose output layer is scaled up, so its text is peaked and repeats itself
and the lookups' drafts are often accepted (the test checks that they are).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine
from specdec.round_draws import draw_round
from specdec.sampling import SamplingParams, warp
from specdec.sequences import SequenceStore
from target_service import steps
from target_service.steps import StepRequest, run_to_completion
from tests.fakes import tiny_llama
from tests.statistical.gtest import P_THRESHOLD, g_test, joint_test, report

pytestmark = [pytest.mark.statistical, pytest.mark.usefixtures("single_torch_thread")]

V = 12
PROMPT = (1, 2, 3, 10, 1, 3, 10, 1, 3, 10, 1)  # the model's own greedy text, which loops: drafts get accepted
STEPS = 3
ROWS = 6_000
CHUNK = 1_000


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model = tiny_llama(V, max_positions=64, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked rows: a text that repeats, drafts that are accepted
    return model


@torch.inference_mode()
def exact_joint(model: torch.nn.Module, params: SamplingParams) -> np.ndarray:
    """P(y1, y2, y3 | PROMPT) [V, V, V] from full forwards of every prefix."""
    def rows(prefixes: list[tuple[int, ...]]) -> np.ndarray:
        logits = model(input_ids=torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1].float()
        return warp(logits, params).double().numpy()  # [n, V]

    first = rows([()])[0]  # [V]
    second = rows([(a,) for a in range(V)])  # [V, V]
    third = rows([(a, b) for a in range(V) for b in range(V)]).reshape(V, V, V)
    joint = first[:, None, None] * second[:, :, None] * third
    return joint / joint.sum()


def decode_many(model: torch.nn.Module, params: SamplingParams, rows: int = ROWS) -> tuple[np.ndarray, float]:
    """``rows`` seeded decodes of STEPS tokens with LOOKUP: the tokens [rows, STEPS] and the share of forwards
    saved (1 - forwards / tokens)."""
    engine = CausalLMEngine(model)
    store = SequenceStore(engine.new_cache, CHUNK, 600.0)
    tokens, forwards = [], 0

    def counted(n: int) -> None:
        nonlocal forwards
        forwards += n

    for first in range(0, rows, CHUNK):
        batch = [
            StepRequest(sid + 1, PROMPT, 0, 1, True, True, params, contract.Decode(STEPS, 1000 + sid, lookup=4))
            for sid in range(first, min(first + CHUNK, rows))
        ]
        for answer in run_to_completion(engine, store, batch, counted, row_cost=0.0):  # rows free: always draft
            assert isinstance(answer, dict), answer
            tokens.append(answer[contract.TOKENS][0])
    samples = np.array(tokens)
    assert samples.shape == (rows, STEPS)
    return samples, 1.0 - forwards / (rows * STEPS)


def distribution_tests(samples: np.ndarray, joint: np.ndarray) -> list:
    first = np.bincount(samples[:, 0], minlength=V)
    return [
        g_test("y1", first, joint.sum(axis=(1, 2)), [str(t) for t in range(V)]),
        joint_test("(y1, y2, y3)", samples, joint),
    ]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)],
                         ids=["temperature1", "top_p0.9"])
def test_decodes_that_verify_looked_up_drafts_sample_the_target(model, params):
    samples, saved = decode_many(model, params)
    tests = distribution_tests(samples, exact_joint(model, params))
    text = report(f"target-side lookup {params} (forwards saved {saved:.2f})", tests)
    assert all(t.pvalue >= P_THRESHOLD for t in tests), text
    assert saved > 0.15  # the drafts were accepted often enough for the test to mean something


def test_negative_control_drawing_from_p_after_a_rejection_is_rejected(model, monkeypatch):
    def from_p_after_rejection(drafts, q, p, *, seed, greedy, reproducible, first):
        result = draw_round(drafts, q, p, seed=seed, greedy=greedy, reproducible=reproducible, first=first)
        n = result.accepted
        if n == len(drafts):
            return result
        row = p.dense()[n : n + 1]  # the bug: p itself, not the residual max(0, p - q)
        final = draw_round([], None, row, seed=seed, greedy=greedy, reproducible=reproducible, first=first + n)
        return type(result)(accepted=n, tokens=[*result.tokens[:n], *final.tokens])

    monkeypatch.setattr(steps, "draw_round", from_p_after_rejection)
    params = SamplingParams(temperature=1.0)
    samples, _ = decode_many(model, params)
    tests = distribution_tests(samples, exact_joint(model, params))
    text = report("negative: target-side lookup drawing from p after a rejection", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text
