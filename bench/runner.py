"""`python -m bench`: run every measurement in one process, on one machine, for one model pair.

Why this module exists: the benchmark's value is that ArS, SpS, the HF peer and the ideal are measured in
the same run under the same conditions. This is the sequence: load the model pair in-process; start the
real stack (Triton + draft service + orchestrator, as `specdec serve` does) and time it from a gRPC client
interleaved with HF generate on the same prompts and with in-process samples of the step costs behind c
and v(K), generation by generation (`bench.schedule`); stop the stack; then, in-process, measure α
on the target's own generations; finally write the table and the figure. ``--sweep`` instead ranks
self-drafts; ``--quick`` does the whole benchmark on a tiny random model in seconds (the CI smoke test).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from tqdm import tqdm

from bench import peer, report, schedule, stack_runs, sweep, theory
from bench.config import BenchConfig, parse_args
from bench.summary import Summary, summarize
from specdec import models
from specdec.gc_freeze import freeze_startup_objects
from specdec.sampling import SamplingParams
from specdec.tiny import TINY_DRAFT_LAYERS, save_tiny_llama_with_tokenizer
from specdec.v1 import generation_pb2_grpc

log = logging.getLogger("specdec.bench")

_ORCHESTRATOR_DEFAULT_MAX_K = 8
_ORCHESTRATOR_ENV = "SPECDEC_ORCHESTRATOR_"  # its flags' environment fallbacks (orchestrator/config.py)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m bench`; prints the output paths on stdout."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if config.quick:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specdec-bench-tiny-")))
            model = str(save_tiny_llama_with_tokenizer(folder / "tiny"))
            config = replace(config, target_model=model, draft_model=model, draft_layers=TINY_DRAFT_LAYERS)
        paths = run_sweep(config) if config.sweep else run_benchmark(config, started)
    for name, path in paths.items():
        sys.stdout.write(f"{name}: {path}\n")
    log.info("benchmark finished in %.0f s", time.monotonic() - started)
    return 0


def run_benchmark(config: BenchConfig, started: float) -> dict[str, Path]:
    tokenizer = models.load_tokenizer(config.target_model, _cache_dir(config))
    prompts = [list(tokenizer(p)["input_ids"]) for p in config.active_prompts]
    modes = [(m, config.sampling(m)) for m in config.modes]
    per_system = len(modes) * len(config.all_ks) * (config.warmup + len(prompts) * config.repeats)
    systems = 3 - config.skip_peer  # the stack, the cost probe, HF
    out_dir = Path(config.out_dir)
    with tqdm(total=systems * per_system + 1, desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        target = models.load_model(config.target_model, cache_dir=_cache_dir(config))
        draft = models.load_model(config.draft_spec, keep_layers=models.parse_layers(config.draft_layers),
                                  dtype=config.draft_dtype, cache_dir=_cache_dir(config))
        hf = None if config.skip_peer else peer.PeerRuns(
            target, draft, config.max_new_tokens, config.warmup_new_tokens, config.seed, tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        freeze_startup_objects(log)  # no full collection of the models' objects inside a timed generation
        # c and v(K) at a representative length: a prompt plus about half a generation.
        context = (prompts[0] * config.max_new_tokens)[: len(prompts[0]) + config.max_new_tokens // 2]
        probe = theory.CostProbe(target, draft, context)
        others: list[schedule.Timed] = [probe] if hf is None else [hf, probe]
        runs = measure_stack(config, prompts, modes, others, bar.update, out_dir / "logs")
        costs = probe.costs(config.ks)
        probe.close()
        bar.set_description("alpha")
        alphas = {mode: theory.measure_alpha(target, draft, _target_only_sequences(runs, mode, prompts), params)
                  for mode, params in modes}
        bar.update(1)
        peer_records = hf.records if hf is not None else []
    _warn_fallbacks(runs)
    settings = _settings(config, prompts, started)
    summary = summarize(runs, peer_records, alphas, costs, config.ks, int(target.config.vocab_size), settings)
    title = (f"{'tiny random model' if config.quick else config.target_model} target, draft layers "
             f"{config.draft_layers} ({config.draft_dtype}), {config.max_new_tokens} new tokens, "
             f"{platform.machine()} x{os.cpu_count()}")
    paths = report.write_report(summary, out_dir, title=title)
    _log_goals(summary)
    return paths


def measure_stack(
    config: BenchConfig,
    prompts: list[list[int]],
    modes: list[tuple[str, SamplingParams]],
    others: Sequence[schedule.Timed],
    progress: Callable[[int], None],
    log_dir: Path,
) -> list[stack_runs.ConfigRun]:
    """Start the real stack on free ports, time every (mode, K) through it, interleaved with the ``others``
    (which keep their own records), then stop it."""
    from cli.stack import LocalStack, StackConfig

    stack_config = StackConfig(
        port=0, target_model=config.target_model, draft_model=config.draft_spec, draft_layers=config.draft_layers,
        draft_dtype=config.draft_dtype, num_draft_tokens=str(min(config.ks)), drafters="model", threads=config.threads,
        cache_dir=config.cache_dir, log_dir=str(log_dir),
    )
    # No fallback to target-only on a slow draft round: that would mix ArS rounds into the SpS numbers.
    env = {f"{_ORCHESTRATOR_ENV}DRAFT_ROUND_TIMEOUT_S": "0", f"{_ORCHESTRATOR_ENV}DRAFT_BREAKER_FAILURES": "0"}
    if max(config.ks) > _ORCHESTRATOR_DEFAULT_MAX_K:
        env[f"{_ORCHESTRATOR_ENV}MAX_NUM_DRAFT_TOKENS"] = str(max(config.ks))
        env["SPECDEC_DRAFT_MAX_NUM_DRAFT_TOKENS"] = str(max(config.ks))
    with LocalStack(stack_config, env=env) as running, grpc.insecure_channel(running.address) as channel:
        counters = stack_runs.CounterReader(running.triton_url, running.triton_metrics_url, running.draft_metrics_url)
        try:
            ours = stack_runs.StackRuns(
                generation_pb2_grpc.GenerationServiceStub(channel), counters, config.max_new_tokens,
                config.warmup_new_tokens, config.seed,
            )
            schedule.run_interleaved(
                [ours, *others], prompts, modes, config.all_ks, config.repeats, config.warmup, progress
            )
            return ours.runs()
        finally:
            counters.close()


def run_sweep(config: BenchConfig) -> dict[str, Path]:
    tokenizer = models.load_tokenizer(config.target_model, _cache_dir(config))
    prompts = [list(tokenizer(p)["input_ids"]) for p in config.active_prompts]
    selections = None
    if config.quick:
        selections = [("first 2", "0-1"), ("skip 1", TINY_DRAFT_LAYERS)]
    count = len(selections) if selections else len(sweep.default_selections(30))
    steps = sweep.sweep_steps(count * len(config.sweep_dtypes))
    with tqdm(total=steps, desc="sweep", file=sys.stderr, dynamic_ncols=True) as bar:
        rows, target_costs = sweep.run_sweep(
            config.target_model, prompts, config.sampling("sample"), config.ks, config.max_new_tokens, config.seed,
            tokenizer.eos_token_id, config.cost_trials, selections, config.sweep_dtypes, _cache_dir(config), bar.update,
        )
    settings = {
        "target": config.target_model, "prompts": str(len(prompts)), "new tokens per prompt": str(config.max_new_tokens),
        "sampling mode": f"temperature {config.temperature}, top-p {config.top_p}, top-k {config.top_k}",
        "threads": str(config.threads), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    return sweep.write_sweep(rows, target_costs, settings, Path(config.out_dir))


def _target_only_sequences(runs: list[stack_runs.ConfigRun], mode: str, prompts: list[list[int]]):
    """(prompt + generated ids, prompt length) of the stack's K = 0 generations in ``mode``: the positions
    the target itself visits, over which α is averaged."""
    return [(prompts[r.prompt_index] + list(r.output_ids), len(prompts[r.prompt_index]))
            for run in runs if run.mode == mode and run.k == 0 for r in run.records]


def _settings(config: BenchConfig, prompts: list[list[int]], started: float) -> dict[str, str]:
    return {
        "target": "tiny random Llama (quick mode)" if config.quick else config.target_model,
        "draft": f"{'the target' if not config.draft_model or config.draft_model == config.target_model else config.draft_model}"
                 f", layers {config.draft_layers or 'all'}, {config.draft_dtype}",
        "prompts": f"{len(prompts)} (prompt tokens {min(map(len, prompts))}–{max(map(len, prompts))}), "
                   f"{config.repeats} repeat(s) each after {config.warmup} warm-up generation(s) per config",
        "new tokens per generation": str(config.max_new_tokens),
        "modes": ", ".join(f"{m} ({config.sampling(m)})" for m in config.modes),
        "threads": f"{config.threads} torch threads per model (in-process, Triton model, draft service)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "measurement wall time": f"{time.monotonic() - started:.0f} s",
    }


def _warn_fallbacks(runs: list[stack_runs.ConfigRun]) -> None:
    fallbacks = sum(r.fallback_rounds for run in runs for r in run.records)
    reprefills = sum(r.reprefills for run in runs for r in run.records)
    if fallbacks or reprefills:
        log.warning("the stack fell back to target-only in %d rounds and re-prefilled %d times: its numbers "
                    "include those", fallbacks, reprefills)


def _log_goals(summary: Summary) -> None:
    for line in report.goals(summary):
        log.info("%s", line.strip())


def _cache_dir(config: BenchConfig) -> Path | None:
    return Path(config.cache_dir) if config.cache_dir else None

