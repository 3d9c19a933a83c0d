"""A tiny random-init Llama saved as a model folder: the fast stand-in for SmolLM2 in tests.

Why it exists: plumbing tests (engine, draft service, Triton model, orchestrator) need a real causal LM
with a KV cache, but not a good one. This one loads in milliseconds through the same path as the real
model (``specdec.models.load_model(folder)``), is deterministic for a given seed, and has a short context
(256 positions) so overflow is testable. No tokenizer is saved: tests speak token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VOCAB_SIZE = 64
TINY_MAX_POSITIONS = 256


def save_tiny_llama(folder: Path | str, seed: int = 0, **overrides: Any) -> Path:
    """Build a seeded random-init Llama (vocab 64, 2 layers, hidden 32) and save_pretrained it into
    ``folder``; ``overrides`` change LlamaConfig fields. Returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
        # The default init (std 0.02) gives near-uniform next-token distributions; sharper logits make
        # greedy/argmax tests meaningful and sampled tokens depend on the context.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.5)
    model.save_pretrained(str(folder))
    return folder
