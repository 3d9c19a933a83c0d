"""Assemble the draft service's core from its config: the drafters it offers, and the model if one needs it.

Why it exists: which drafters a deployment offers decides what it loads. A replica that offers only
model-free drafters (``--drafters ngram,suffix``) loads no model, starts in a fraction of a second and needs
no GPU; one that offers ``model`` or ``hybrid`` loads the draft model once and runs its steps on one
`StepLoop` (batched across streams). ``server.create_server`` calls this; tests call it with a model of
their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from draft_service.config import DraftConfig
from draft_service.core import DraftCore, ModelLimits
from draft_service.drafters.base import Drafter
from draft_service.drafters.hybrid import HybridDrafter
from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NgramDrafter
from draft_service.drafters.steps import StepLoop
from draft_service.drafters.suffix import SuffixCache, SuffixDrafter
from specdec.engine import CausalLMEngine
from specdec.models import load_model, parse_layers

log = logging.getLogger(__name__)


def load_draft_model(config: DraftConfig) -> torch.nn.Module:
    """Load the draft model named by ``config`` (blocking: ~0.2 s, or ~20 s on the first SmolLM2 use)."""
    log.info("loading draft model %r (layers %s, %s, %s)", config.model, config.keep_layers or "all", config.device,
             config.dtype)
    start = time.perf_counter()
    model = load_model(
        config.model, device=config.device, dtype=config.dtype, keep_layers=parse_layers(config.keep_layers),
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
    )
    log.info("draft model loaded in %.1f s: %d layers, vocab %d", time.perf_counter() - start,
             model.config.num_hidden_layers, model.config.vocab_size)
    return model


def build_core(
    config: DraftConfig,
    model: torch.nn.Module | None = None,
    on_forward: Callable[[int], None] = lambda sequences: None,
) -> tuple[DraftCore, StepLoop | None]:
    """The core offering ``config.drafters`` (``model`` replaces loading the configured one), and the step
    loop its model drafter runs on (None when no drafter needs a model; stop it with the server)."""
    names = config.drafter_names
    loop = drafter_model = None
    if config.loads_model:
        engine = CausalLMEngine(model if model is not None else load_draft_model(config), config.max_sequences,
                                config.kv_slot_tokens)
        loop = StepLoop(engine, config.threads, on_forward, config.max_forward_tokens)
        drafter_model = ModelDrafter(loop)
    lookups_needed = set(names) | ({config.hybrid_lookup} if "hybrid" in names else set())
    ngram = NgramDrafter(config.ngram_min, config.ngram_max) if "ngram" in lookups_needed else None
    cache = suffix = None
    if "suffix" in lookups_needed:
        cache = SuffixCache(config.suffix_depth, config.suffix_cache_entries, config.suffix_cache_ttl_s)
        suffix = SuffixDrafter(cache, min_score=config.suffix_min_score)
    by_name: dict[str, Drafter | None] = {"model": drafter_model, "ngram": ngram, "suffix": suffix}
    if "hybrid" in names:
        lookup = by_name[config.hybrid_lookup]
        assert lookup is not None and drafter_model is not None
        by_name["hybrid"] = HybridDrafter(lookup, drafter_model)
    offered = {name: by_name[name] for name in names}
    components = [drafter for drafter in (drafter_model, ngram, suffix) if drafter is not None]
    limits = None if loop is None else ModelLimits(loop.engine.vocab_size, loop.engine.max_length)
    core = DraftCore(offered, components, config.max_sequences, config.idle_ttl_s, config.max_num_draft_tokens,
                     limits, cache)
    log.info("drafters %s (default %s)%s", list(offered), names[0], "" if loop else "; no model loaded")
    return core, loop
