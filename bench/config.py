"""The benchmark's settings: one frozen BenchConfig, built once from the command line.

Why this module exists: every part of the benchmark (stack runs, the peer, the theory, the report) must
measure the same thing — the same model pair, prompts, token budget, K values and sampling settings — so
they all read one immutable object, and its defaults (the ones the README's figure is made with) are
declared here and nowhere else.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from specdec.models import SMOLLM2, SMOLLM2_SELF_DRAFT_LAYERS, parse_dtype, parse_layers
from specdec.sampling import SamplingParams

# The best SmolLM2 self-draft found by `python -m bench --sweep` on this machine (bench/out/sweep.md): drop
# layers 14-16, weights in bfloat16 (half the bytes to read per step; the target stays float32).
DEFAULT_DRAFT_LAYERS = SMOLLM2_SELF_DRAFT_LAYERS
DEFAULT_DRAFT_DTYPE = "bfloat16"

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of the Roman Empire begins",
    "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Here is a short story about a robot who learns to paint:",
    "The three most important things to know about machine learning are",
    "To make a good cup of coffee, you should",
    "The theory of relativity, proposed by Albert Einstein,",
    "Once upon a time, in a small village by the sea,",
)

MODES = ("greedy", "sample")


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures; every field has a flag (see ``parse_args``)."""

    ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # K > 0 for SpS; K = 0 (ArS) is always measured
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    num_prompts: int = 3
    max_new_tokens: int = 32
    repeats: int = 1  # measured generations per (config, prompt)
    warmup: int = 1  # unmeasured generations per config before measuring
    warmup_new_tokens: int = 8  # their length: enough to run prefill and a few rounds of every path
    target_model: str = SMOLLM2
    draft_model: str = ""  # "" = the target's weights (a self-draft cut down to draft_layers)
    draft_layers: str = DEFAULT_DRAFT_LAYERS
    draft_dtype: str = DEFAULT_DRAFT_DTYPE
    sweep_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    modes: tuple[str, ...] = MODES
    temperature: float = 0.8  # the sampling mode's settings (greedy uses temperature 0)
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 1234
    threads: int = 2  # torch threads: in-process runs, and per model process in the stack
    out_dir: str = "bench/out"
    quick: bool = False
    skip_peer: bool = False
    sweep: bool = False  # run the self-draft sweep instead of the benchmark
    cost_trials: int = 15  # --sweep: timed forwards per width when measuring c and v(K)
    cache_dir: str = ""

    @property
    def all_ks(self) -> tuple[int, ...]:
        """K = 0 (the target-only baseline) followed by the speculative Ks."""
        return (0, *self.ks)

    @property
    def active_prompts(self) -> tuple[str, ...]:
        return self.prompts[: self.num_prompts]

    @property
    def draft_spec(self) -> str:
        return self.draft_model or self.target_model

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


def _modes(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or any(v not in MODES for v in values):
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {MODES}, got {text!r}")
    return values


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


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="ArS vs SpS through the full stack vs Hugging Face assisted generation, with the ideal.",
    )
    add = parser.add_argument
    add("--ks", type=_int_list, default=d.ks, help="speculative K values, e.g. 1,2,4 (K=0 is always run)")
    add("--prompts", type=Path, help="a text file with one prompt per line (default: built-in prompts)")
    add("--num-prompts", type=int, default=d.num_prompts, help="how many prompts to use")
    add("--max-new-tokens", type=int, default=d.max_new_tokens)
    add("--repeats", type=int, default=d.repeats, help="measured generations per config and prompt")
    add("--warmup", type=int, default=d.warmup, help="unmeasured generations per config first")
    add("--warmup-new-tokens", type=int, default=d.warmup_new_tokens, help="tokens per warm-up generation")
    add("--target-model", default=d.target_model, help="'smollm2' or a local HF model folder")
    add("--draft-model", default=d.draft_model, help="draft model folder; default: the target's weights")
    add("--draft-layers", default=d.draft_layers, help="layers the draft keeps, e.g. 0-7 ('' = all)")
    add("--draft-dtype", default=d.draft_dtype, help="draft weights dtype: float32 | bfloat16 | float16")
    add("--sweep-dtypes", type=_dtypes, default=d.sweep_dtypes, help="draft dtypes the sweep tries")
    add("--modes", type=_modes, default=d.modes, help="greedy, sample or both")
    add("--temperature", type=float, default=d.temperature, help="temperature of the sampling mode")
    add("--top-p", type=float, default=d.top_p, help="top-p of the sampling mode")
    add("--top-k", type=int, default=d.top_k, help="top-k of the sampling mode (0 disables)")
    add("--seed", type=int, default=d.seed)
    add("--threads", type=int, default=d.threads, help="torch threads per model (in-process and per service)")
    add("--out-dir", default=d.out_dir, help="where the table (.md, .csv) and the figure (.png) go")
    add("--quick", action="store_true", help="smoke test: tiny random models, K in {0,1,2}, a few tokens")
    add("--skip-peer", action="store_true", help="do not run Hugging Face generate")
    add("--sweep", action="store_true", help="sweep SmolLM2 self-drafts (alpha, cost, ideal) instead")
    add("--cost-trials", type=int, default=d.cost_trials, help="--sweep: timed forwards per width for c and v(K)")
    add("--cache-dir", default=d.cache_dir, help="converted-model cache ('' = ~/.cache/specdec)")
    return parser


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    """Flags -> a validated BenchConfig (``--quick`` shrinks every budget to a few seconds)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = BenchConfig.prompts
    if args.prompts is not None:
        prompts = tuple(line for line in args.prompts.read_text().splitlines() if line.strip())
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if f.name != "prompts"}
    config = BenchConfig(prompts=prompts, **values)
    if config.quick:
        config = replace(config, ks=(1, 2), num_prompts=min(config.num_prompts, 2), max_new_tokens=8,
                         repeats=1, warmup=1, cost_trials=3)
    try:
        validate(config)
    except ValueError as exc:
        parser.error(str(exc))
    return config


def validate(config: BenchConfig) -> None:
    """Raise ValueError for settings no run could honour."""
    if not 1 <= config.num_prompts <= len(config.prompts):
        raise ValueError(f"--num-prompts must be in [1, {len(config.prompts)}], got {config.num_prompts}")
    for name in ("max_new_tokens", "repeats", "cost_trials", "warmup_new_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if config.warmup < 0 or config.threads < 0:
        raise ValueError("--warmup and --threads must be >= 0")
    if config.temperature <= 0:
        raise ValueError("--temperature is the sampling mode's (> 0); greedy is measured as its own mode")
    parse_layers(config.draft_layers)
    parse_dtype(config.draft_dtype)
    config.sampling("sample")  # validates top-p / top-k
