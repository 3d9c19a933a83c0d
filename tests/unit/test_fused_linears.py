"""Fused projections (`specdec.fused_linears`): the model computes what it did before, whatever the order of
the calls; the group keeps nothing between steps; only matching groups are fused; packing packs each once;
`load_model` fuses the stack's models and leaves the benchmark peer's alone when told."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdec.cpu_linear import PackedLinear, pack_linears
from specdec.engine import CausalLMEngine
from specdec.fused_linears import FusedProjection, fuse_projections
from specdec.models import load_model
from specdec.tiny import save_tiny_llama, tiny_llama
from tests.fakes import gen


class _Attention(torch.nn.Module):
    def __init__(self, bias: tuple[bool, bool, bool] = (False, False, False)) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16, bias=bias[0])
        self.k_proj = torch.nn.Linear(16, 8, bias=bias[1])
        self.v_proj = torch.nn.Linear(16, 8, bias=bias[2])


def _outputs(module: torch.nn.Module, x: torch.Tensor, order: str) -> dict[str, torch.Tensor]:
    return {name: getattr(module, f"{name}_proj")(x) for name in order}


@pytest.mark.parametrize("bias", [(False, False, False), (True, True, True), (True, False, True)])
def test_each_projection_computes_what_it_did_alone(bias: tuple[bool, bool, bool]) -> None:
    torch.manual_seed(0)
    module = _Attention(bias)
    x = torch.randn(2, 5, 16, generator=gen(1))
    expected = _outputs(module, x, "qkv")
    assert fuse_projections(module) == 1
    assert all(isinstance(getattr(module, f"{n}_proj"), FusedProjection) for n in "qkv")
    for order in ("qkv", "vkq", "kk", "v"):  # any order, repeats, a member never asked for
        got = _outputs(module, x, order)
        for name, value in got.items():
            torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6)


def test_another_input_is_computed_not_served_from_the_last_one() -> None:
    module = _Attention()
    x, y = torch.randn(3, 16, generator=gen(2)), torch.randn(3, 16, generator=gen(3))
    expected = {"x": _outputs(module, x, "qkv"), "y": _outputs(module, y, "qkv")}
    fuse_projections(module)
    q_x = module.q_proj(x)
    k_y = module.k_proj(y)  # a different tensor: its own product, not x's
    x.mul_(2)  # x changed in place: served again only if unchanged
    k_x2 = module.k_proj(x)
    torch.testing.assert_close(q_x, expected["x"]["q"])
    torch.testing.assert_close(k_y, expected["y"]["k"])
    torch.testing.assert_close(k_x2, 2 * expected["x"]["k"], atol=1e-5, rtol=1e-5)


def test_the_group_holds_nothing_once_every_member_has_read() -> None:
    module = _Attention()
    fuse_projections(module)
    group = module.q_proj.group
    x = torch.randn(4, 16, generator=gen(4))
    module.q_proj(x)
    module.k_proj(x)
    assert group._output is not None  # v has not read yet
    module.v_proj(x)
    assert group._output is None and group._input is None


def test_groups_that_do_not_match_stay_as_they_are() -> None:
    module = _Attention()
    module.k_proj = torch.nn.Linear(12, 8)  # another input size
    mlp = torch.nn.Module()
    mlp.gate_proj = torch.nn.Linear(16, 32)
    mlp.up_proj = PackedLinear(torch.nn.Linear(16, 32))  # not a plain linear any more
    assert fuse_projections(module) == 0 and fuse_projections(mlp) == 0
    assert type(module.q_proj) is torch.nn.Linear and type(mlp.gate_proj) is torch.nn.Linear


def test_a_fused_model_gives_the_logits_and_the_engine_rows_it_gave_before() -> None:
    stock = tiny_llama(seed=5)
    fused = tiny_llama(seed=5)
    groups = fuse_projections(fused)
    layers = fused.config.num_hidden_layers
    assert groups == 2 * layers
    assert pack_linears(fused) == 4 * layers + 1  # qkv, o, gate-up, down per layer, and the output layer
    pack_linears(stock)
    ids = torch.randint(0, stock.config.vocab_size, (1, 11), generator=gen(6))
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    rows = []
    for model in (stock, fused):
        engine = CausalLMEngine(model)
        cache = engine.new_cache()
        engine.extend(cache, 0, ids[0, :8].tolist(), 1)
        rows.append(engine.extend(cache, 6, ids[0, 6:].tolist(), 5))  # a roll-back and a 5-token verification
    torch.testing.assert_close(rows[1], rows[0], atol=1e-5, rtol=1e-5)


def test_load_model_fuses_unless_told_not_to(tmp_path: Path) -> None:
    folder = str(save_tiny_llama(tmp_path, seed=7))
    fused, plain = load_model(folder), load_model(folder, fused_projections=False)
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedProjection)
    assert isinstance(fused.model.layers[0].mlp.up_proj, FusedProjection)
    assert attention.q_proj.group is attention.v_proj.group and isinstance(attention.q_proj.group.linear, PackedLinear)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, PackedLinear)  # the HF peer's way: packed, not fused
    ids = torch.randint(0, fused.config.vocab_size, (1, 9), generator=gen(8))
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
