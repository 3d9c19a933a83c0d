"""Single-stream phases: one generation in flight, every arm on every prompt, interleaved.

Why this module exists: a user's latency is what one generation costs, and it depends on the text. For
each workload the fixed K that a drafter does best with is first chosen on *calibration* prompts (never
measured afterwards: choosing on the measured prompts would flatter the fixed Ks), then each measured
prompt runs under every arm in turn — target-only, each drafter at its chosen K and at auto, HF plain and
HF prompt lookup at its chosen K — so the machine's drift over minutes hits every arm alike and each
speedup is a paired comparison. Also here: the model draft's phase (its fixed Ks, the coupled mode
against the modified rejection sampling, α for the ideal) and the suffix cache's serving history and two
passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bench.arms import HF, HF_PLAIN, PROMPT_LOOKUP, SPECDEC, TARGET_ONLY, Arm, Record
from bench.config import BenchConfig
from bench.stats import rate
from bench.systems import Systems

log = logging.getLogger(__name__)

LOOKUP_DRAFTERS = ("suffix", "ngram")  # model-free drafters whose best fixed K is calibrated
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Item:
    """One measured unit of a workload: a prompt (and, for the README's prompts, a repeat) and its seed."""

    index: int
    prompt_ids: tuple[int, ...]
    seed: int


Progress = Callable[[str], None]


def best_fixed_k(records: Iterable[Record], workload: str, mode: str, name: str, ks: Sequence[int]) -> int:
    """The K with the highest aggregate tokens/s among the calibration records of one drafter (or HF)."""
    def label(k: int) -> str:
        return Arm(HF, PROMPT_LOOKUP, k).label if name == PROMPT_LOOKUP else Arm(SPECDEC, name, k).label

    records = [r for r in records if r.workload == workload and r.mode == mode]
    scored = {k: rate([r.tokens for r in records if r.arm == label(k)],
                      [r.wall_ms for r in records if r.arm == label(k)]) for k in ks}
    return max(sorted(scored), key=lambda k: scored[k] if scored[k] == scored[k] else -1.0)


def calibrate(systems: Systems, config: BenchConfig, workload: str, items: Sequence[Item],
              progress: Progress) -> list[Record]:
    """Every fixed K of the lookup drafters and of HF prompt lookup, on the calibration items."""
    arms = [Arm(SPECDEC, d, k) for d in LOOKUP_DRAFTERS for k in config.ks]
    if systems.peer is not None:
        arms += [Arm(HF, PROMPT_LOOKUP, k) for k in config.ks]
    return _interleave(systems, config, "calibration", workload, items, lambda mode: arms, progress)


def single_arms(config: BenchConfig, workload: str, mode: str, best: dict[tuple[str, str, str], int],
                peer: bool) -> list[Arm]:
    """What the single-stream phase compares on one workload and mode."""
    arms = [TARGET_ONLY]
    for drafter in LOOKUP_DRAFTERS:
        if (workload, mode, drafter) in best:
            arms.append(Arm(SPECDEC, drafter, best[(workload, mode, drafter)]))
        arms.append(Arm(SPECDEC, drafter, None))
    arms += [Arm(SPECDEC, "hybrid", None), Arm(SPECDEC, "model", None)]
    if peer:
        arms.append(HF_PLAIN)
        if (workload, mode, PROMPT_LOOKUP) in best:
            arms.append(Arm(HF, PROMPT_LOOKUP, best[(workload, mode, PROMPT_LOOKUP)]))
    return arms


def single_stream(systems: Systems, config: BenchConfig, workload: str, items: Sequence[Item],
                  best: dict[tuple[str, str, str], int], progress: Progress) -> list[Record]:
    return _interleave(systems, config, "single", workload, items,
                       lambda mode: single_arms(config, workload, mode, best, systems.peer is not None), progress)


def model_arms(config: BenchConfig, mode: str) -> list[Arm]:
    """The model draft's phase: target-only, each fixed K (and coupled when sampling), auto."""
    arms = [TARGET_ONLY]
    for k in config.model_ks:
        arms.append(Arm(SPECDEC, "model", k))
        if mode == "sample":
            arms.append(Arm(SPECDEC, "model", k, coupled=True))
    return [*arms, Arm(SPECDEC, "model", None)]


def model_phase(systems: Systems, config: BenchConfig, items: Sequence[Item], progress: Progress) -> list[Record]:
    return _interleave(systems, config, "model", "readme+open", items, lambda mode: model_arms(config, mode), progress)


def cache_pass(systems: Systems, config: BenchConfig, items: Sequence[Item], arms: Sequence[Arm], phase: str,
               progress: Progress) -> list[Record]:
    """Greedy generations of HumanEval ``items``, each under ``arms`` in turn, labelled ``phase``: the suffix
    cache phase's serving history and its passes (`bench.runner`). The cache learns from the sequences the
    draft service sees, so its arm drafts at a fixed K (under auto, a generation whose speculation stays
    off is never sent there), and only one arm per item may feed it: a second would find the first's
    output of the same prompt."""
    records = []
    params = config.sampling("greedy")
    for item in items:
        for arm in arms:
            records.append(systems.run(arm, item.prompt_ids, params, item.seed, phase=phase, workload="humaneval",
                                       mode="greedy", item=item.index))
            progress(phase)
    return records


def warm_up(systems: Systems, config: BenchConfig, arms: Iterable[Arm], prompt_ids: Sequence[int]) -> None:
    """One short unmeasured generation per arm and mode: first calls allocate and connect."""
    for mode in config.modes:
        for arm in arms:
            systems.run(arm, prompt_ids, config.sampling(mode), config.seed - 1, max_new_tokens=WARMUP_TOKENS,
                        phase="warm-up", workload="", mode=mode, item=-1)


def _interleave(systems: Systems, config: BenchConfig, phase: str, workload: str, items: Sequence[Item],
                arms_of: Callable[[str], list[Arm]], progress: Progress) -> list[Record]:
    """Each item under every mode and arm in turn (the pairing every ratio relies on)."""
    records = []
    for item in items:
        for mode in config.modes:
            params = config.sampling(mode)
            for arm in arms_of(mode):
                records.append(systems.run(arm, item.prompt_ids, params, item.seed, phase=phase, workload=workload,
                                           mode=mode, item=item.index))
                progress(f"{phase} {workload}")
    return records
