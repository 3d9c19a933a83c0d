"""Packed CPU linears (`specdec.cpu_linear`): nn.Linear's results to float tolerance, batch-invariant rows,
every linear of a loaded model replaced, and nothing done where oneDNN cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdec.cpu_linear import PackedLinear, available, bucket, pack_linears
from specdec.engine import CausalLMEngine, StepItem
from specdec.models import load_model
from specdec.tiny import save_tiny_llama
from tests.fakes import gen


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_computes_what_the_linear_does(bias: bool, dtype: torch.dtype) -> None:
    if not available(dtype):
        pytest.fail(f"oneDNN cannot run {dtype} here")  # specdec.cpu_linear would leave such a model unpacked
    linear = torch.nn.Linear(96, 160, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(2, 7, 96, generator=gen(1)).to(dtype)  # [B, T, in]: leading dimensions pass through
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed(x), linear(x), atol=tolerance, rtol=tolerance)
    with pytest.raises(TypeError, match="expected"):
        packed(x.to(torch.float64))


def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    packed = PackedLinear(torch.nn.Linear(576, 1536))
    x = torch.randn(17, 576, generator=gen(2))
    together = packed(x)
    for rows in (slice(0, 1), slice(3, 4), slice(5, 14), slice(0, 17)):
        assert torch.equal(packed(x[rows]), together[rows]), rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3)


def test_a_loaded_model_runs_every_linear_packed_and_agrees_with_stock(folder: Path) -> None:
    packed, stock = load_model(str(folder)), load_model(str(folder), packed_linears=False)
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert sum(type(m) is torch.nn.Linear for m in stock.modules()) == sum(
        isinstance(m, PackedLinear) for m in packed.modules()) > 0
    ids = torch.randint(0, packed.config.vocab_size, (1, 12), generator=gen(4))
    with torch.inference_mode():
        torch.testing.assert_close(packed(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_sequences_rows_are_the_same_alone_and_batched(folder: Path) -> None:
    engine = CausalLMEngine(load_model(str(folder)))
    vocab = engine.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen(n)).tolist() for n in (5, 9, 3)]

    def rows(batch: list[int]) -> list[torch.Tensor]:
        caches = {i: engine.new_cache() for i in batch}
        for i in batch:
            engine.step([StepItem(caches[i], 0, prompts[i], 1)])
        out = engine.step([StepItem(caches[i], len(prompts[i]), [1, 2, 3], 3) for i in batch])
        return [r for r in out if isinstance(r, torch.Tensor)]

    alone = [rows([i])[0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(alone, rows([0, 1, 2])))


def test_nothing_is_packed_where_onednn_cannot_run(folder: Path) -> None:
    model = load_model(str(folder), packed_linears=False).to(torch.float64)
    assert pack_linears(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())


def test_row_counts_fall_into_few_buckets_with_little_padding() -> None:
    sizes = [bucket(n) for n in range(1, 8193)]
    assert sizes[:16] == list(range(1, 17))  # decode and verification steps run unpadded
    assert all(n <= b <= 1.25 * n for n, b in enumerate(sizes, start=1))
    assert sizes == sorted(sizes) and len(set(sizes)) == 52  # one oneDNN kernel per size, not per prompt length


def test_padded_rows_give_the_unpadded_results() -> None:
    linear = torch.nn.Linear(64, 96)
    packed = PackedLinear(linear)
    x = torch.randn(1, 37, 64, generator=gen(5))  # 37 rows run as 40
    torch.testing.assert_close(packed(x), linear(x), atol=1e-4, rtol=1e-4)
    assert torch.equal(packed(x)[0, :5], packed(x[:, :37])[0, :5])
