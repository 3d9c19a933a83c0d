"""Probability rows on the wire: packed little-endian float32 bytes, never `repeated float`.

A row is V floats (49,152 for SmolLM2); `repeated float` would cost a Python object per entry. Both the
draft service (encoding q) and the orchestrator (decoding it) go through here so the layout is defined once.
"""

from __future__ import annotations

import numpy as np
import torch

_WIRE_DTYPE = np.dtype("<f4")


def encode_rows(rows: torch.Tensor) -> bytes:
    """rows [K, V] (any float dtype/device) -> K*V*4 bytes, row-major little-endian float32."""
    return rows.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype(_WIRE_DTYPE, copy=False).tobytes()


def decode_rows(data: bytes, num_rows: int, width: int) -> torch.Tensor:
    """The inverse of encode_rows -> [num_rows, width] float32 (CPU); ValueError on a size mismatch."""
    expected = num_rows * width * _WIRE_DTYPE.itemsize
    if len(data) != expected:
        raise ValueError(f"expected {num_rows}x{width} float32 rows ({expected} bytes), got {len(data)} bytes")
    array = np.frombuffer(data, dtype=_WIRE_DTYPE).reshape(num_rows, width)
    return torch.from_numpy(array.astype(np.float32, copy=True))
