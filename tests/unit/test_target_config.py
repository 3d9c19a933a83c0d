"""`target_service.config` and the launcher's rendering: the target's settings are declared once.

The checked-in config.pbtxt must agree with `TargetModelParams`' defaults, the launcher must render every
field, and the GPU variant in deploy/triton/ may differ only in instance kind and dtype.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from target_service import launcher
from target_service.config import TargetModelParams, TritonServerConfig

# --- the model configuration --------------------------------------------------------------------------


def checked_in_parameters() -> dict[str, str]:
    text = (launcher.MODEL_TEMPLATE / "config.pbtxt").read_text()
    return dict(re.findall(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text))


def test_the_checked_in_config_matches_the_parameter_defaults():
    params = checked_in_parameters()
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    assert set(params) == set(TargetModelParams.__dataclass_fields__)
    assert TargetModelParams.from_model_config(config) == TargetModelParams()
    text = (launcher.MODEL_TEMPLATE / "config.pbtxt").read_text()
    assert launcher.render_config(text, TritonServerConfig()) == text  # the launcher's defaults agree


def test_parameters_are_parsed_and_checked():
    def config(**values: str) -> dict[str, Any]:
        return {"parameters": {k: {"string_value": v} for k, v in values.items()}}

    params = TargetModelParams.from_model_config(config(max_sequences="3", idle_ttl_s="1.5", keep_layers="0-1"))
    assert (params.max_sequences, params.idle_ttl_s, params.keep_layers) == (3, 1.5, "0-1")
    with pytest.raises(ValueError, match="unknown"):
        TargetModelParams.from_model_config(config(modle="x"))
    with pytest.raises(ValueError, match="max_sequences"):
        TargetModelParams.from_model_config(config(max_sequences="many"))
    with pytest.raises(ValueError):
        TargetModelParams.from_model_config(config(keep_layers="3-1"))


def test_the_launcher_renders_every_field():
    text = (launcher.MODEL_TEMPLATE / "config.pbtxt").read_text()
    cfg = TritonServerConfig(
        params=TargetModelParams(
            model='/models/my "odd" dir', keep_layers="0-13,17-29", dtype="bfloat16", threads=3, max_sequences=5,
            idle_ttl_s=20.0, cache_dir="/cache",
        ),
        instance_kind="KIND_GPU",
        instance_count=2,
        max_batch_size=4,
    )
    rendered = launcher.render_config(text, cfg)
    params = dict(re.findall(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"', rendered))
    assert params == {
        "model": '/models/my \\"odd\\" dir',
        "keep_layers": "0-13,17-29",
        "dtype": "bfloat16",
        "threads": "3",
        "max_sequences": "5",
        "idle_ttl_s": "20",
        "batch_wait_ms": "20",
        "max_forward_tokens": "256",
        "kv_slot_tokens": "512",
        "lookup_row_cost": "0.05",
        "prefix_cache_mb": "64",
        "cache_dir": "/cache",
    }
    assert "kind: KIND_GPU" in rendered and re.search(r"count:\s*2\b", rendered)
    assert re.search(r"max_batch_size:\s*4\b", rendered)
    assert re.search(r"preferred_batch_size:\s*\[\s*4\s*\]", rendered)
    assert re.search(r"max_candidate_sequences:\s*10\b", rendered)
    assert re.search(rf"max_sequence_idle_microseconds:\s*{launcher.triton_idle_us(20.0)}\b", rendered)
    assert launcher.triton_idle_us(20.0) > 20_000_000


def _without_comments(text: str) -> str:
    return " ".join(re.sub(r"#[^\n]*", "", text).split())


def test_the_gpu_config_differs_only_in_instance_kind_and_dtype():
    cpu = (launcher.MODEL_TEMPLATE / "config.pbtxt").read_text()
    gpu = (launcher.MODEL_TEMPLATE.parents[2] / "deploy" / "triton" / "config.pbtxt").read_text()
    expected = launcher.render_config(cpu, TritonServerConfig(instance_kind="KIND_GPU", params=TargetModelParams(dtype="bfloat16")))
    assert _without_comments(gpu) == _without_comments(expected)
