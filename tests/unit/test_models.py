"""specdec.models: layer selections, self-drafts, and the errors of loading a model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.models import _keep_layers, parse_dtype, parse_layers, resolve_model_dir


def test_layer_selection_parsing() -> None:
    assert parse_layers("") is None
    assert parse_layers("0-3") == (0, 1, 2, 3)
    assert parse_layers("0-1,4,6-7") == (0, 1, 4, 6, 7)
    for bad in ("a-b", "3-1", "0-2,1-3", "2,1"):
        with pytest.raises(ValueError):
            parse_layers(bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("float8")


def test_a_self_draft_keeping_all_layers_equals_the_model_and_fewer_differ() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    full = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        reference = full(ids).logits
        same = LlamaForCausalLM(config).eval()
        same.load_state_dict(full.state_dict())
        _keep_layers(same, (0, 1, 2, 3))
        torch.testing.assert_close(same(ids).logits, reference)
        _keep_layers(full, (0, 3))
        assert full.config.num_hidden_layers == 2
        assert [layer.self_attn.layer_idx for layer in full.model.layers] == [0, 1]
        assert not torch.allclose(full(ids).logits, reference)
    with pytest.raises(ValueError, match="does not fit"):
        _keep_layers(full, (0, 5))


def test_a_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_dir(str(tmp_path / "nope"))


