"""specdec.rows: probability rows packed as their support, decoded bit for bit, restricted to a common support."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.rows import PackedRows, decode_packed, encode_rows, on_common_support, pack_rows
from specdec.sampling import SamplingParams, warp


def test_dense_rows_round_trip_bit_for_bit() -> None:
    rows = torch.rand(3, 11)  # every entry non-zero: too wide a support to pack
    values, index = encode_rows(rows)
    assert index == b"" and len(values) == 3 * 11 * 4
    assert torch.equal(decode_packed(values, index, 3, 11).dense(), rows)
    with pytest.raises(ValueError, match="expected 3x12 float32 rows"):
        decode_packed(values, index, 3, 12)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.3, top_k=7)],
)
def test_warped_rows_travel_as_their_support_and_come_back_bit_for_bit(params: SamplingParams) -> None:
    torch.manual_seed(0)
    rows = warp(torch.randn(5, 1000) * 3, params)  # [5, V]
    values, index = encode_rows(rows)
    support = int(torch.count_nonzero(rows, dim=-1).max())
    assert len(index) == len(values) == 5 * support * 4 < 5 * 1000 * 4 / 2
    assert torch.equal(decode_packed(values, index, 5, 1000).dense(), rows)
    if params.greedy:
        assert support == 1


def test_packed_rows_with_supports_of_different_sizes() -> None:
    rows = torch.zeros(3, 10)
    rows[0, 7] = 1.0
    rows[1, [2, 5, 9]] = torch.tensor([0.5, 0.25, 0.25])
    values, index = pack_rows(rows)  # row 2 is all zero
    assert index is not None and values.shape == index.shape == (3, 3)
    assert torch.equal(PackedRows.from_arrays(values, index, 10).dense(), rows)


def test_row_sets_restricted_to_their_common_support() -> None:
    p = torch.zeros(2, 12)
    p[0, [2, 9]] = torch.tensor([0.25, 0.75])
    p[1, 4] = 1.0
    q = torch.zeros(1, 6)  # narrower, and dense on purpose (PackedRows.of_dense)
    q[0, [4, 5]] = 0.5
    columns, (p_s, q_s) = on_common_support(
        [PackedRows.from_arrays(*pack_rows(p), 12), PackedRows.of_dense(q)], np.array([11, 2])
    )
    assert columns.tolist() == [2, 4, 5, 9, 11]  # every non-zero entry, plus the extra ids, sorted
    assert p_s.dtype == q_s.dtype == np.float64
    assert p_s.tolist() == p[:, columns].tolist()
    assert q_s.tolist() == [[0.0, 0.5, 0.5, 0.0, 0.0]]  # token 9 and 11 are beyond q's width: 0


def test_malformed_packed_rows_are_refused() -> None:
    rows = torch.zeros(2, 50)
    rows[0, [3, 40]] = 0.5
    rows[1, [1, 45]] = 0.5
    values, index = encode_rows(rows)
    with pytest.raises(ValueError, match="as many float32 values as int32 token ids"):
        decode_packed(values[:-4], index, 2, 50)
    with pytest.raises(ValueError, match=r"token ids in \[0, 20\), got \[1, 45\]"):
        decode_packed(values, index, 2, 20)
    repeated = np.frombuffer(index, "<i4").copy()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match="repeats a token id"):
        decode_packed(values, repeated.tobytes(), 2, 50)


