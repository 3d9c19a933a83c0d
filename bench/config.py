"""The benchmark's settings: one frozen BenchConfig, built once from the command line.

Why this module exists: every phase of the benchmark (single stream, load, the suffix cache's two passes,
the model draft's ideal) must measure the same thing — the same model, workloads, token budget and
sampling settings — so they all read one immutable object, and its defaults (the ones the checked-in
results are made with) are declared here and nowhere else.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from bench.workloads import WORKLOADS
from orchestrator.config import OrchestratorConfig
from specdec.models import SMOLLM2, SMOLLM2_SELF_DRAFT_LAYERS, parse_dtype, parse_layers
from specdec.sampling import SamplingParams

MODES = ("greedy", "sample")
DRAFTERS = ("suffix", "ngram", "hybrid", "model")  # what the benchmark's stack offers; `specdec serve`'s order
PHASES = ("single", "model", "load", "two-pass")


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures; every field has a flag (see ``parse_args``)."""

    phases: tuple[str, ...] = PHASES
    workloads: tuple[str, ...] = WORKLOADS
    prompts_per_workload: int = 12  # measured prompts of each workload (readme has 2: it runs them `repeats`x)
    readme_repeats: int = 6  # the README's two prompts, each this many times (other seeds when sampling)
    calibration_prompts: int = 2  # further prompts per workload on which the best fixed K is chosen
    max_new_tokens: int = 64
    ks: tuple[int, ...] = (2, 4, 8, 16)  # fixed Ks the calibration tries for the lookup drafters and HF
    modes: tuple[str, ...] = MODES
    temperature: float = 0.8  # the sampling mode's settings (greedy uses temperature 0)
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 1234
    model_ks: tuple[int, ...] = (1, 2)  # the model draft's fixed Ks (its phase: ideal, coupled vs MRS)
    model_prompts: int = 6  # prompts of the model draft's phase (from readme + open)
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    load_workloads: tuple[str, ...] = ("code-edit", "open")
    load_generations: int = 8  # generations per (workload, K, concurrency) and round (at least 2 waves of c)
    load_rounds: int = 4  # each load cell runs this many times, arms in turn, the order reversed every round: the
    # rounds are the unit its intervals come from (bench/stats.py), so more of shorter ones beat fewer long ones
    cancel_generations: int = 32  # the cancellation run after the load phase (16 in flight)
    two_pass_prompts: int = 12  # HumanEval prompts the suffix cache sees twice
    history_prompts: int = 32  # other HumanEval problems the suffix cache serves before the two passes
    target_model: str = SMOLLM2
    draft_layers: str = SMOLLM2_SELF_DRAFT_LAYERS  # the model drafter: the target's weights cut down
    draft_dtype: str = "float32"
    threads: int = 2  # torch threads: in-process runs, and per model process in the stack
    out_dir: str = "bench/out"
    quick: bool = False
    skip_peer: bool = False
    stock_peer: bool = False  # the HF peer on stock PyTorch linears instead of the stack's packed ones
    sweep: bool = False  # run the self-draft sweep instead of the benchmark
    sweep_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    sweep_ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    sweep_prompts: int = 3
    cost_trials: int = 15  # --sweep: timed forwards per width when measuring c and v(K)
    cache_dir: str = ""

    def sampling(self, mode: str) -> SamplingParams:
        """The sampling parameters of a mode: greedy, or the configured temperature / top-p / top-k."""
        if mode == "greedy":
            return SamplingParams(temperature=0.0)
        if mode == "sample":
            return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 1, got {text!r}")
    return tuple(sorted(values))


def _choices(allowed: Sequence[str]):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
        return values

    return parse


def _dtypes(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    try:
        for value in values:
            parse_dtype(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one dtype")
    return values


_HELP = {
    "phases": "which phases to run: single (every drafter vs target-only vs HF, per workload), model (the model "
              "draft: ideal, coupled vs MRS), load (concurrency), two-pass (the suffix cache)",
    "workloads": "single-stream workloads",
    "prompts_per_workload": "measured prompts per workload",
    "readme_repeats": "times each README prompt is measured",
    "calibration_prompts": "prompts per workload that choose each drafter's best fixed K (not measured)",
    "ks": "fixed Ks tried by the calibration (lookup drafters and HF prompt lookup)",
    "modes": "greedy, sample or both",
    "temperature": "temperature of the sampling mode",
    "top_p": "top-p of the sampling mode",
    "top_k": "top-k of the sampling mode (0 disables)",
    "model_ks": "fixed Ks of the model draft's phase",
    "model_prompts": "prompts of the model draft's phase",
    "concurrency": "generations in flight in the load phase",
    "load_workloads": "workloads of the load phase",
    "load_generations": "generations per load cell and round (at least twice the concurrency)",
    "load_rounds": "rounds of every load cell: the arms take turns, in reverse order every other round, so that "
                   "the machine's drift falls on all of them alike",
    "cancel_generations": "generations of the cancellation run (16 in flight, each cancelled at a random time)",
    "two_pass_prompts": "HumanEval prompts the suffix cache sees twice",
    "history_prompts": "other HumanEval problems (never measured) the two-pass phase's fresh draft service serves "
                       "first, as a running service has served others before (0: the passes start from an empty "
                       "cache)",
    "target_model": "'smollm2' or a local HF model folder",
    "draft_layers": "layers the model drafter keeps ('' = all)",
    "draft_dtype": "the model drafter's weights dtype",
    "threads": "torch threads per model (in-process and per service)",
    "out_dir": "where the tables (.md, .csv) and figures (.png) go",
    "quick": "smoke test: a tiny random model, 2 prompts per workload, a few tokens",
    "skip_peer": "do not run Hugging Face generate",
    "stock_peer": "run Hugging Face generate on stock PyTorch linear layers (by default it gets the same "
                  "oneDNN-packed weights as the stack: specdec/cpu_linear.py)",
    "sweep": "sweep SmolLM2 self-drafts (alpha, cost, ideal) instead",
    "sweep_dtypes": "--sweep: draft dtypes tried",
    "sweep_ks": "--sweep: Ks of the ideal",
    "sweep_prompts": "--sweep: prompts",
    "cost_trials": "--sweep: timed forwards per width for c and v(K)",
    "cache_dir": "converted-model cache ('' = ~/.cache/specdec)",
}
_TYPES = {
    "phases": _choices(PHASES), "workloads": _choices(WORKLOADS), "load_workloads": _choices(WORKLOADS),
    "modes": _choices(MODES), "ks": _int_list, "model_ks": _int_list, "concurrency": _int_list,
    "sweep_ks": _int_list, "sweep_dtypes": _dtypes,
}


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="specdec through its whole stack vs target-only vs Hugging Face, single stream and under load.",
    )
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=_HELP[f.name])
        else:
            kind = _TYPES.get(f.name, type(default))
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            parser.add_argument(flag, type=kind, default=default, help=f"{_HELP.get(f.name, '')} (default: {shown})")
    return parser


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    """Flags -> a validated BenchConfig (``--quick`` shrinks every budget to a few seconds)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    if config.quick:
        config = replace(
            config, prompts_per_workload=2, readme_repeats=1, calibration_prompts=1, max_new_tokens=8, ks=(2, 4),
            model_ks=(1,), model_prompts=2, concurrency=(1, 4), load_workloads=("code-edit",), load_generations=4,
            load_rounds=2, cancel_generations=8, two_pass_prompts=2, history_prompts=2, sweep_ks=(1, 2),
            sweep_prompts=2, cost_trials=3,
        )
    try:
        validate(config)
    except ValueError as exc:
        parser.error(str(exc))
    return config


def validate(config: BenchConfig) -> None:
    """Raise ValueError for settings no run could honour."""
    for name in ("prompts_per_workload", "readme_repeats", "max_new_tokens", "model_prompts", "load_generations",
                 "load_rounds", "cancel_generations", "two_pass_prompts", "sweep_prompts", "cost_trials"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if config.calibration_prompts < 0 or config.threads < 0 or config.history_prompts < 0:
        raise ValueError("--calibration-prompts, --threads and --history-prompts must be >= 0")
    if config.temperature <= 0:
        raise ValueError("--temperature is the sampling mode's (> 0); greedy is measured as its own mode")
    limit = OrchestratorConfig.max_num_draft_tokens
    if max(config.ks + config.model_ks) > limit:
        raise ValueError(f"K is at most {limit} (the orchestrator's default maximum)")
    parse_layers(config.draft_layers)
    parse_dtype(config.draft_dtype)
    config.sampling("sample")  # validates top-p / top-k
