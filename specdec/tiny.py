"""Tiny random-init Llama models saved as model folders: the fast stand-ins for SmolLM2.

Why it exists: plumbing tests (engine, draft service, Triton model, orchestrator), the end-to-end
statistical tests and the benchmark's quick mode need a real causal LM with a KV cache, loaded through the
same path as the real model (``specdec.models.load_model(folder)``), but not a good one: these load in
milliseconds, are deterministic for a seed, and have short contexts so overflow is testable.

* `tiny_llama` (in memory) and `save_tiny_llama`: token ids only (no tokenizer), vocabulary 64, 2 layers;
  sharp random weights, so greedy/argmax tests mean something and sampled tokens depend on the context.
* `save_tiny_llama_with_tokenizer`: a byte-level tokenizer (any text encodes), vocabulary 272, 4 layers,
  an end-of-sequence token that is practically never sampled, so generations run to their length; the
  benchmark's quick mode and every test that sends text use it. ``TINY_DRAFT_LAYERS`` cuts it down to a
  layer-skip self-draft, as in the default SmolLM2 pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VOCAB_SIZE = 64
TINY_MAX_POSITIONS = 256
TINY_TEXT_LAYERS = 4
TINY_DRAFT_LAYERS = "0,2-3"  # a layer-skip self-draft of the tokenizer model
_SPECIALS = ("<unk>", "<s>", "</s>")


def tiny_llama(seed: int = 0, **overrides: Any):  # noqa: ANN201 - a transformers LlamaForCausalLM
    """A seeded random Llama in memory, in eval mode: vocab 64, 2 layers, hidden 32, 256 positions, and
    weights sharp enough that a wrong position, mask or head shows in its logits; ``overrides`` change
    LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
        # The default init (std 0.02) gives near-uniform next-token distributions.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.5)
    return model.eval()


def save_tiny_llama(folder: Path | str, seed: int = 0, with_tokenizer: bool = False, **overrides: Any) -> Path:
    """`tiny_llama` saved into ``folder``. ``with_tokenizer`` adds a word-level tokenizer with one word per
    token id ("t0", "t1", ...) and no end-of-sequence token, so a server can decode any output and
    generations always run to their length (the statistical tests through the stack). Returns the folder."""
    folder = Path(folder)
    model = tiny_llama(seed, **overrides)
    model.save_pretrained(str(folder))
    if with_tokenizer:
        _word_tokenizer(model.config.vocab_size).save_pretrained(str(folder))
    return folder


def _word_tokenizer(vocab_size: int):
    """One word per token id, space-separated, no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0")


def _byte_level_tokenizer():
    """A byte-level BPE with no merges: 3 special tokens + the 256 byte symbols, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def save_tiny_llama_with_tokenizer(folder: Path | str, seed: int = 0) -> Path:
    """A tiny random Llama (4 layers, hidden 64) and its byte-level tokenizer saved into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=272,  # >= 259 tokens, padded to a multiple of 16
        hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Peaked distributions (a random init is near-uniform), so acceptance rates mean something, and a
        # zero EOS row (logit 0 among logits of std ~3) so generations practically never end early.
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
