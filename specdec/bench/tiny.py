"""A tiny random-init model with its own byte-level tokenizer, for the benchmark's quick mode.

Why this module exists: the quick mode runs in CI as a smoke test of the whole benchmark (the real stack
processes, Triton included), so it must not depend on a real model being converted, and must finish in
seconds. The folder written here is a complete Hugging Face model folder (config, safetensors weights,
tokenizer) that every part of the stack loads by path, exactly as it would load a real model; the draft is
the same folder cut down to fewer layers (a self-draft), as in the default SmolLM2 pair.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LAYERS = 4
TINY_DRAFT_LAYERS = "0,2-3"  # a layer-skip self-draft of the tiny target
_SPECIALS = ("<unk>", "<s>", "</s>")


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


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama (4 layers, hidden 64) and its tokenizer into ``folder``; returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    vocab_size = 272  # >= 259 tokens, padded to a multiple of 16
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
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
