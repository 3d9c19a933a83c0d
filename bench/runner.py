"""`python -m bench`: every phase in one process, on one machine, against the real stack.

Why this module exists: the benchmark's value is that everything it compares is measured in the same run
under the same conditions. The sequence: load the model in-process (for Hugging Face generate and α);
start the real stack as `specdec serve` does (Triton, the draft service offering every drafter, the
orchestrator; free ports, logs under the output folder), with the suffix drafter's cross-request cache
off so that a prompt measured under several arms cannot feed its own later runs; then the phases —
single stream per workload (calibration, then every arm interleaved), the model draft, load, and the
suffix cache's phase (the draft service restarted with its cache on: a serving history of other HumanEval
problems, then the measured ones twice) — and finally the report.
``--sweep`` instead ranks self-drafts; ``--quick`` does the whole benchmark on a tiny random model in
seconds (the CI smoke test).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from tqdm import tqdm

from bench import client, load, single, sweep, theory, workloads
from bench.arms import HF, PROMPT_LOOKUP, SPECDEC, TARGET_ONLY, Arm
from bench.config import DRAFTERS, BenchConfig, parse_args
from bench.goals import goals
from bench.peer import Peer
from bench.report import write_report
from bench.single import Item
from bench.summary import Results, select
from bench.systems import Systems
from draft_service.config import DraftConfig
from specdec import models
from specdec.gc_freeze import freeze_startup_objects
from specdec.tiny import TINY_DRAFT_LAYERS, save_tiny_llama_with_tokenizer
from specdec.v1 import generation_pb2_grpc

log = logging.getLogger("specdec.bench")

_NO_SUFFIX_CACHE = {"SPECDEC_DRAFT_SUFFIX_CACHE_ENTRIES": "0"}
_QUICK_PROMPT_TOKENS = 256  # the tiny model's byte-level prompts, cut to fit its 1024 positions


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m bench`; prints the output paths on stdout."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the servers the run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    torch.set_num_threads(config.threads or torch.get_num_threads())
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if config.quick:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specdec-bench-tiny-")))
            model = str(save_tiny_llama_with_tokenizer(folder / "tiny"))
            config = replace(config, target_model=model, draft_layers=TINY_DRAFT_LAYERS)
        paths = run_sweep(config) if config.sweep else run_benchmark(config, started)
    for name, path in paths.items():
        sys.stdout.write(f"{name}: {path}\n")
    log.info("benchmark finished in %.0f s", time.monotonic() - started)
    return 0


def _prompt_ids(config: BenchConfig, tokenizer, workload: str, count: int) -> list[list[int]]:  # noqa: ANN001
    ids = workloads.token_ids(tokenizer, workloads.prompts(workload, tokenizer, count))
    return [prompt[-_QUICK_PROMPT_TOKENS:] for prompt in ids] if config.quick else ids


def workload_items(config: BenchConfig, tokenizer, workload: str) -> tuple[list[Item], list[Item]]:  # noqa: ANN001
    """(measured items, calibration items) of a workload; the README's prompts are measured repeatedly."""
    count = config.prompts_per_workload
    extra = 0 if workload == "readme" else config.calibration_prompts
    ids = _prompt_ids(config, tokenizer, workload, count + extra)
    if workload == "readme":
        measured = [Item(p * config.readme_repeats + r, tuple(prompt), config.seed + p * config.readme_repeats + r)
                    for p, prompt in enumerate(ids) for r in range(config.readme_repeats)]
        return measured, []
    if len(ids) < count + extra:
        log.warning("workload %s has %d prompts; measuring %d", workload, len(ids), max(len(ids) - extra, 1))
        count = max(len(ids) - extra, 1)
    items = [Item(i, tuple(prompt), config.seed + i) for i, prompt in enumerate(ids)]
    return items[:count], items[count:count + extra]


def history_items(config: BenchConfig, tokenizer) -> list[Item]:  # noqa: ANN001
    """The suffix cache phase's serving history: ``history_prompts`` HumanEval problems after the measured
    and calibration ones (never measured, never calibrated on)."""
    skip = config.prompts_per_workload + config.calibration_prompts
    ids = _prompt_ids(config, tokenizer, "humaneval", skip + config.history_prompts)[skip:]
    return [Item(skip + i, tuple(prompt), config.seed + skip + i) for i, prompt in enumerate(ids)]


def run_benchmark(config: BenchConfig, started: float) -> dict[str, Path]:
    from cli.stack import LocalStack, StackConfig

    cache_dir = _cache_dir(config)
    tokenizer = models.load_tokenizer(config.target_model, cache_dir)
    needed = set(config.workloads) | (set(config.load_workloads) if "load" in config.phases else set())
    needed |= {"readme", "open"} if "model" in config.phases else set()
    needed |= {"humaneval"} if "two-pass" in config.phases else set()
    items = {w: workload_items(config, tokenizer, w) for w in workloads.WORKLOADS if w in needed}
    history = history_items(config, tokenizer) if "two-pass" in config.phases else []
    # The HF peer runs its model's own code (q, k, v and gate, up as separate linears), on the stack's kernels.
    target = models.load_model(config.target_model, cache_dir=cache_dir, packed_linears=not config.stock_peer,
                               fused_projections=False)
    peer = None if config.skip_peer else Peer(target, tokenizer.eos_token_id, tokenizer.pad_token_id)
    freeze_startup_objects(log)  # no full collection of the model's objects inside a timed generation
    out_dir = Path(config.out_dir)
    stack_config = StackConfig(
        port=0, target_model=config.target_model, drafters=",".join(DRAFTERS), draft_model=config.target_model,
        draft_layers=config.draft_layers, draft_dtype=config.draft_dtype, num_draft_tokens="auto",
        threads=config.threads, cache_dir=config.cache_dir, log_dir=str(out_dir / "logs"),
    )
    results = Results(suffix_cache_bound=DraftConfig().suffix_cache_entries)
    bar = tqdm(desc="bench", unit="gen", file=sys.stderr, dynamic_ncols=True)

    def progress(label: str) -> None:
        bar.set_description(label)
        bar.update(1)

    with LocalStack(stack_config, env=_NO_SUFFIX_CACHE) as running, grpc.insecure_channel(running.address) as channel:
        servers = client.ServerReader(running.triton_metrics_url, running.draft_address)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        systems = Systems(stub, servers, peer, config.max_new_tokens)
        try:
            any_prompt = next(iter(items.values()))[0][0].prompt_ids
            single.warm_up(systems, config, _all_arms(config, peer is not None), any_prompt)
            _single_phases(systems, config, items, results, progress)
            if "model" in config.phases:
                _model_phase(systems, config, items, results, target, cache_dir, progress)
            if "load" in config.phases:
                _load_phase(stub, servers, config, items, results, systems, progress)
            if "two-pass" in config.phases:
                _two_pass(running, systems, servers, config, items, history, results, progress)
        finally:
            servers.close()
            bar.close()
    _warn_fallbacks(results)
    results.settings = _settings(config, items, history, started)
    title = (f"{'tiny random model' if config.quick else config.target_model}, {config.max_new_tokens} new tokens, "
             f"{platform.machine()} x{os.cpu_count()}")
    paths = write_report(results, out_dir, title)
    for goal in goals(results):
        log.info("issue %d: %s: %s (goal %g) %s", goal.issue, goal.text, format(goal.value, ".2f"), goal.threshold,
                 "met" if goal.met else "NOT MET")
    return paths


def _all_arms(config: BenchConfig, peer: bool) -> list[Arm]:
    arms = single.single_arms(config, "", "greedy", {}, peer)
    arms += [Arm(SPECDEC, d, k) for d in single.LOOKUP_DRAFTERS for k in config.ks]
    return arms


def _single_phases(systems: Systems, config: BenchConfig, items: dict[str, tuple[list[Item], list[Item]]],
                   results: Results, progress: single.Progress) -> None:
    calibrate = set(config.load_workloads) if "load" in config.phases else set()
    calibrate |= set(config.workloads) if "single" in config.phases else set()
    calibrate |= {"humaneval"} if "two-pass" in config.phases else set()  # its fixed K and HF's
    for workload in workloads.WORKLOADS:
        if workload in calibrate and items[workload][1]:
            records = single.calibrate(systems, config, workload, items[workload][1], progress)
            results.records += records
            for mode in config.modes:
                for name in (*single.LOOKUP_DRAFTERS, *(["prompt-lookup"] if systems.peer else [])):
                    results.best[(workload, mode, name)] = single.best_fixed_k(records, workload, mode, name, config.ks)
        if "single" in config.phases and workload in config.workloads:
            results.records += single.single_stream(systems, config, workload, items[workload][0], results.best,
                                                    progress)


def _model_phase(systems: Systems, config: BenchConfig, items: dict[str, tuple[list[Item], list[Item]]],
                 results: Results, target: torch.nn.Module, cache_dir: Path | None, progress: single.Progress) -> None:
    readme = items["readme"][0][:: config.readme_repeats]  # each README prompt once
    chosen = [*readme, *(Item(1000 + i.index, i.prompt_ids, i.seed) for i in items["open"][0])][: config.model_prompts]
    records = single.model_phase(systems, config, chosen, progress)
    results.records += records
    draft = models.load_model(config.target_model, keep_layers=models.parse_layers(config.draft_layers),
                              dtype=config.draft_dtype, cache_dir=cache_dir)
    prompts = {i.index: i.prompt_ids for i in chosen}
    for mode in config.modes:
        sequences = [(list(prompts[r.item]) + list(r.output_ids), len(prompts[r.item]))
                     for r in select(records, arm=TARGET_ONLY.label, mode=mode)]
        results.alphas[mode] = theory.measure_alpha(target, draft, sequences, config.sampling(mode)).mean
    del draft


def _load_phase(stub: generation_pb2_grpc.GenerationServiceStub, servers: client.ServerReader, config: BenchConfig,
                items: dict[str, tuple[list[Item], list[Item]]], results: Results, systems: Systems,
                progress: single.Progress) -> None:
    before, _ = servers.wait_idle()
    params = config.sampling("greedy")
    for workload in config.load_workloads:
        prompts = [i.prompt_ids for i in items[workload][0]]
        arms = [TARGET_ONLY, Arm(SPECDEC, "suffix", results.best.get((workload, "greedy", "suffix"), config.ks[-1])),
                Arm(SPECDEC, "suffix", None)]
        for concurrency in config.concurrency:
            generations = max(config.load_generations, 2 * concurrency)
            rounds: dict[str, list[load.Cell]] = {arm.label: [] for arm in arms}
            for r in range(config.load_rounds):  # arms in turn, reversed every other round: drift falls on all
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    cell, records = load.run_cell(stub, servers, arm, params, prompts, concurrency, generations,
                                                  config.max_new_tokens, config.seed, workload, "greedy",
                                                  first=r * generations)
                    rounds[arm.label].append(cell)
                    results.records += records
                    progress(f"load {workload} c={concurrency}")
            results.cells += [load.Cell.merged(cells) for cells in rounds.values()]
    workload = config.load_workloads[0]
    results.cancel = load.cancel_run(
        stub, servers, [Arm(SPECDEC, "suffix", None), Arm(SPECDEC, "model", max(config.model_ks))], params, [i.prompt_ids for i in items[workload][0]],
        config.cancel_generations, max(config.concurrency), max(4 * config.max_new_tokens, 128), config.seed, before,
        progress,
    )  # generations long enough that most cancellations land mid-generation


def _two_pass(running, systems: Systems, servers: client.ServerReader, config: BenchConfig,  # noqa: ANN001
              items: dict[str, tuple[list[Item], list[Item]]], history: Sequence[Item], results: Results,
              progress: single.Progress) -> None:
    """The suffix drafter's cross-request cache, greedy, at its calibrated fixed K: a fresh draft service
    with its cache on serves ``history`` (other HumanEval problems, as a running service has answered
    others before), then the measured problems twice. Pass 1, each problem met for the first time, runs
    beside target-only and HF prompt lookup at its calibrated K; pass 2 finds pass 1's outputs."""
    running.restart("draft", env={key: None for key in _NO_SUFFIX_CACHE})  # a fresh draft service, cache on
    chosen = items["humaneval"][0][: config.two_pass_prompts]
    unmeasured = [*history[:1], *items.get("open", ([], []))[0][:1]]  # the warm-ups must not feed a measured prompt
    warm = unmeasured[0].prompt_ids if unmeasured else chosen[0].prompt_ids
    _until_the_draft_answers(systems, config, warm)
    k = results.best.get(("humaneval", "greedy", "suffix"), max(config.ks))
    suffix = Arm(SPECDEC, "suffix", k)
    single.warm_up(systems, config, [suffix], warm)
    results.records += single.cache_pass(systems, config, history, [suffix], "history", progress)
    results.suffix_cache["history"] = _cache_reading(servers)
    hf_k = results.best.get(("humaneval", "greedy", PROMPT_LOOKUP))
    peer = [Arm(HF, PROMPT_LOOKUP, hf_k)] if systems.peer is not None and hf_k else []
    results.records += single.cache_pass(systems, config, chosen, [TARGET_ONLY, suffix, *peer], "pass 1", progress)
    results.suffix_cache["pass 1"] = _cache_reading(servers)
    results.records += single.cache_pass(systems, config, chosen, [TARGET_ONLY, suffix], "pass 2", progress)
    results.suffix_cache["pass 2"] = _cache_reading(servers)


def _until_the_draft_answers(systems: Systems, config: BenchConfig, prompt_ids: Sequence[int],
                             timeout_s: float = 60.0) -> None:
    """Unmeasured drafting generations until one runs without a draft fallback. Right after a restart the
    orchestrator's channel to the draft service is still in its reconnect backoff, and the failures it sees
    meanwhile open its circuit breaker for a while: a pass measured then would be target-only."""
    arm, deadline = Arm(SPECDEC, "suffix", max(config.ks)), time.monotonic() + timeout_s
    while systems.run(arm, prompt_ids, config.sampling(config.modes[0]), config.seed - 1,
                      max_new_tokens=single.WARMUP_TOKENS, phase="warm-up", workload="", mode=config.modes[0],
                      item=-1).fallback_rounds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the orchestrator did not reach the restarted draft service in {timeout_s:.0f} s")
        time.sleep(0.5)


def _cache_reading(servers: client.ServerReader) -> tuple[int, int]:
    reading = servers.occupancy()
    return reading.suffix_cache_entries, reading.suffix_cache_bytes


def run_sweep(config: BenchConfig) -> dict[str, Path]:
    tokenizer = models.load_tokenizer(config.target_model, _cache_dir(config))
    texts = workloads.prompts("open", tokenizer, config.sweep_prompts)
    prompts = workloads.token_ids(tokenizer, texts)
    if config.quick:
        prompts = [p[-_QUICK_PROMPT_TOKENS:] for p in prompts]
    selections = [("first 2", "0-1"), ("skip 1", TINY_DRAFT_LAYERS)] if config.quick else None
    count = len(selections) if selections else len(sweep.default_selections(30))
    steps = sweep.sweep_steps(count * len(config.sweep_dtypes))
    with tqdm(total=steps, desc="sweep", file=sys.stderr, dynamic_ncols=True) as bar:
        rows, target_costs = sweep.run_sweep(
            config.target_model, prompts, config.sampling("sample"), config.sweep_ks, config.max_new_tokens,
            config.seed, tokenizer.eos_token_id, config.cost_trials, selections, config.sweep_dtypes,
            _cache_dir(config), bar.update,
        )
    settings = {
        "target": config.target_model, "prompts": f"{len(prompts)} (open workload)",
        "new tokens per prompt": str(config.max_new_tokens),
        "sampling mode": f"temperature {config.temperature}, top-p {config.top_p}, top-k {config.top_k}",
        "threads": str(config.threads), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    return sweep.write_sweep(rows, target_costs, settings, Path(config.out_dir))


def _settings(config: BenchConfig, items: dict[str, tuple[list[Item], list[Item]]], history: Sequence[Item],
              started: float) -> dict[str, str]:
    sizes = ", ".join(f"{w} {len(m)} measured + {len(c)} calibration" for w, (m, c) in items.items())
    return {
        "target": "tiny random Llama (quick mode)" if config.quick else config.target_model,
        "model drafter": f"the target's layers {config.draft_layers or 'all'} ({config.draft_dtype})",
        "workloads": f"{sizes} prompts (bench/workloads.py)",
        "new tokens per generation": str(config.max_new_tokens),
        "modes": ", ".join(f"{m} ({config.sampling(m)})" for m in config.modes),
        "fixed Ks calibrated": ", ".join(map(str, config.ks)),
        "suffix cache": "off, except in the two-pass phase (so a prompt measured under several arms cannot feed "
                        f"its own later runs); there, on, after a history of {len(history)} other HumanEval problems",
        "threads": f"{config.threads} torch threads per model (in-process, Triton model, draft service)",
        "linear kernels": "oneDNN-packed weights in the stack, q/k/v and gate/up fused (specdec/fused_linears.py); "
                          "the HF peer runs its model's own code, "
                          + ("on stock PyTorch linears" if config.stock_peer else "on the same packed kernels "
                             "(specdec/cpu_linear.py)"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "wall time": f"{time.monotonic() - started:.0f} s",
    }


def _warn_fallbacks(results: Results) -> None:
    fallbacks = sum(r.fallback_rounds for r in results.records)
    reprefills = sum(r.reprefills for r in results.records)
    if fallbacks or reprefills:
        log.warning("the stack fell back to target-only in %d rounds and re-prefilled %d times: its numbers "
                    "include those", fallbacks, reprefills)


def _cache_dir(config: BenchConfig) -> Path | None:
    return Path(config.cache_dir) if config.cache_dir else None
