"""Probability rows on the wire: each row's support as packed bytes, never `repeated float`, never all of V.

A warped row (design.md §1) is V probabilities (49,152 for SmolLM2), but under greedy, top-k or top-p
only a few of them are non-zero: one under greedy, a nucleus of tens to hundreds under top-p. So a set of
rows [R, V] travels as its support: ``values`` [R, M] float32 and ``index`` [R, M] int32 token ids, M
being the largest support of any row (a row with a smaller support is padded with zero-probability
entries). `PackedRows.dense()` scatters the values back into zeros: the rows come back **bit for bit**, so
the rejection sampler sees exactly what was sampled from. Rows whose support is wider than half of V
(plain temperature sampling) travel dense instead, with no index (``index`` is None / empty bytes).

Both ends of both hops go through here (the draft service and the Triton target model pack; the
orchestrator unpacks), so the layout is defined once. Bytes are little-endian. The orchestrator keeps
rows packed (`PackedRows`): the sampler reads only the columns some row gives a non-zero probability.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def encode_rows(rows: torch.Tensor) -> tuple[bytes, bytes]:
    """rows [R, V] -> (values, index) bytes for a protobuf message; index is b"" for dense rows."""
    values, index = pack_rows(rows)
    return values.astype(_VALUE, copy=False).tobytes(), b"" if index is None else index.astype(_INDEX).tobytes()


def decode_packed(values: bytes, index: bytes, num_rows: int, width: int) -> PackedRows:
    """encode_rows' bytes -> PackedRows, kept packed; ValueError on any size mismatch."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if not index:
        expected = num_rows * width * _VALUE.itemsize
        if len(values) != expected:
            raise ValueError(f"expected {num_rows}x{width} float32 rows ({expected} bytes), got {len(values)} bytes")
        return PackedRows.from_arrays(np.frombuffer(values, dtype=_VALUE).reshape(num_rows, width), None, width)
    if len(index) != len(values) or len(index) % (num_rows * _INDEX.itemsize):
        raise ValueError(
            f"expected {num_rows} rows of as many float32 values as int32 token ids, got {len(values)} bytes of "
            f"values and {len(index)} bytes of index"
        )
    support = len(index) // (num_rows * _INDEX.itemsize)
    return PackedRows.from_arrays(
        np.frombuffer(values, dtype=_VALUE).reshape(num_rows, support),
        np.frombuffer(index, dtype=_INDEX).reshape(num_rows, support),
        width,
    )


@dataclass(frozen=True)
class PackedRows:
    """Probability rows [R, width] held as their support: ``values`` [R, M] float32 and ``index`` [R, M]
    int64 token ids (entries with value 0 are padding), or ``index`` None for dense rows (M = width).

    ``shape`` and ``dim()`` answer as the dense tensor would, so shape checks need not care which it is.
    """

    values: torch.Tensor
    index: torch.Tensor | None
    width: int

    @classmethod
    def from_arrays(cls, values: np.ndarray, index: np.ndarray | None, width: int) -> PackedRows:
        """The inverse of pack_rows (ValueError if the parts do not fit); an index of None, or with no
        columns ([R, 0], as Triton carries "no index"), means dense rows."""
        if values.ndim != 2:
            raise ValueError(f"values must have shape [R, M], got {list(values.shape)}")
        if index is not None and index.ndim == 2 and index.shape[1] == 0 and index.shape[0] == values.shape[0]:
            index = None
        if index is None:
            if values.shape[1] != width:
                raise ValueError(f"dense rows must be {width} wide, got {values.shape[1]}")
            return cls(torch.from_numpy(np.array(values, dtype=np.float32)), None, width)
        if index.shape != values.shape:
            raise ValueError(f"index {list(index.shape)} and values {list(values.shape)} differ in shape")
        if index.size:
            if int(index.min()) < 0 or int(index.max()) >= width:
                raise ValueError(
                    f"index must hold token ids in [0, {width}), got [{int(index.min())}, {int(index.max())}]"
                )
            ordered = np.sort(index, axis=-1)
            if (ordered[:, 1:] == ordered[:, :-1]).any():
                raise ValueError("index repeats a token id within a row")
        return cls(torch.from_numpy(values.astype(np.float32)), torch.from_numpy(index.astype(np.int64)), width)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.width)

    def dim(self) -> int:
        return 2

    def support(self) -> torch.Tensor:
        """Sorted token ids to which some row gives a non-zero probability."""
        if self.index is None:
            return self.values.ne(0).any(dim=0).nonzero().squeeze(-1)
        return torch.unique(self.index[self.values.ne(0)])

    def take(self, columns: torch.Tensor) -> torch.Tensor:
        """The rows restricted to ``columns`` (sorted token ids, a superset of the support) -> [R, S];
        a column beyond ``width`` is 0."""
        out = torch.zeros(self.values.shape[0], columns.numel(), dtype=self.values.dtype)
        if self.index is None:
            inside = columns < self.width
            out[:, inside] = self.values[:, columns[inside]]
        else:
            rows, entries = self.values.ne(0).nonzero(as_tuple=True)
            out[rows, torch.searchsorted(columns, self.index[rows, entries])] = self.values[rows, entries]
        return out

    def dense(self) -> torch.Tensor:
        """[R, width] float32."""
        return self.take(torch.arange(self.width))
