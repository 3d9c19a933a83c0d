"""Probability rows on the wire: each row's support as packed bytes, never `repeated float`, never all of V.

A warped row (design.md §1) is V probabilities (49,152 for SmolLM2), but under greedy, top-k or top-p
only a few of them are non-zero: one under greedy, a nucleus of tens to hundreds under top-p. So a set of
rows [R, V] travels as its support: ``values`` [R, M] float32 and ``index`` [R, M] int32 token ids, M
being the largest support of any row (a row with a smaller support is padded with zero-probability
entries). Unpacking scatters the values back into zeros: the dense rows come back **bit for bit**, so
the rejection sampler sees exactly what was sampled from. Rows whose support is wider than half of V
(plain temperature sampling) travel dense instead, with no index (``index`` is None / empty bytes).

Both ends of both hops go through here (the draft service and the Triton target model pack; the
orchestrator unpacks), so the layout is defined once. Bytes are little-endian.
"""

from __future__ import annotations

import numpy as np
import torch

_VALUE = np.dtype("<f4")
_INDEX = np.dtype("<i4")


def pack_rows(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """rows [R, V] of probabilities (any float dtype or device) -> (values [R, M] float32, index [R, M]
    int32) holding every non-zero entry, or (values [R, V], None) when a row's support exceeds V / 2."""
    if rows.dim() != 2:
        raise ValueError(f"rows must have shape [R, V], got {tuple(rows.shape)}")
    rows = rows.detach().to(dtype=torch.float32)
    width = rows.shape[-1]
    support = int(torch.count_nonzero(rows, dim=-1).max()) if rows.numel() else 0
    if 2 * max(support, 1) > width:
        return rows.cpu().contiguous().numpy(), None
    values, index = torch.topk(rows, max(support, 1), dim=-1)  # every non-zero entry, then zeros as padding
    return values.cpu().numpy(), index.to(torch.int32).cpu().numpy()


def unpack_rows(values: np.ndarray, index: np.ndarray | None, width: int) -> torch.Tensor:
    """The inverse of pack_rows -> [R, width] float32 on the CPU; ValueError if the parts do not fit.

    An ``index`` of None, or with no columns ([R, 0], as Triton carries "no index"), means dense rows."""
    if values.ndim != 2:
        raise ValueError(f"values must have shape [R, M], got {list(values.shape)}")
    if index is None or (index.ndim == 2 and index.shape[1] == 0 and index.shape[0] == values.shape[0]):
        if values.shape[1] != width:
            raise ValueError(f"dense rows must be {width} wide, got {values.shape[1]}")
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy
    if index.shape != values.shape:
        raise ValueError(f"index {list(index.shape)} and values {list(values.shape)} differ in shape")
    if index.size:
        if int(index.min()) < 0 or int(index.max()) >= width:
            raise ValueError(f"index must hold token ids in [0, {width}), got [{int(index.min())}, {int(index.max())}]")
        ordered = np.sort(index, axis=-1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError("index repeats a token id within a row")
    dense = torch.zeros(values.shape[0], width, dtype=torch.float32)
    dense.scatter_(-1, torch.from_numpy(index.astype(np.int64)), torch.from_numpy(values.astype(np.float32)))
    return dense


def encode_rows(rows: torch.Tensor) -> tuple[bytes, bytes]:
    """rows [R, V] -> (values, index) bytes for a protobuf message; index is b"" for dense rows."""
    values, index = pack_rows(rows)
    return values.astype(_VALUE, copy=False).tobytes(), b"" if index is None else index.astype(_INDEX).tobytes()


def decode_rows(values: bytes, index: bytes, num_rows: int, width: int) -> torch.Tensor:
    """The inverse of encode_rows -> [num_rows, width] float32 (CPU); ValueError on any size mismatch."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if not index:
        expected = num_rows * width * _VALUE.itemsize
        if len(values) != expected:
            raise ValueError(f"expected {num_rows}x{width} float32 rows ({expected} bytes), got {len(values)} bytes")
        return unpack_rows(np.frombuffer(values, dtype=_VALUE).reshape(num_rows, width), None, width)
    if len(index) != len(values) or len(index) % (num_rows * _INDEX.itemsize):
        raise ValueError(
            f"expected {num_rows} rows of as many float32 values as int32 token ids, got {len(values)} bytes of "
            f"values and {len(index)} bytes of index"
        )
    support = len(index) // (num_rows * _INDEX.itemsize)
    return unpack_rows(
        np.frombuffer(values, dtype=_VALUE).reshape(num_rows, support),
        np.frombuffer(index, dtype=_INDEX).reshape(num_rows, support),
        width,
    )
