"""Probability rows on the wire: each row's support as packed bytes, never `repeated float`, never all of V.

A warped row (docs/architecture.md, "One round") is V probabilities (49,152 for SmolLM2), but under greedy, top-k or top-p
only a few of them are non-zero: one under greedy, a nucleus of tens to hundreds under top-p. So a set of
rows [R, V] travels as its support: ``values`` [R, M] float32 and ``index`` [R, M] int32 token ids, M
being the largest support of any row (a row with a smaller support is padded with zero-probability
entries). `PackedRows.dense()` scatters the values back into zeros: the rows come back **bit for bit**, so
the rejection sampler sees exactly what was sampled from. Rows whose support is wider than half of V
(plain temperature sampling) travel dense instead, with no index (``index`` is None / empty bytes).

Both ends of both hops go through here (the draft service and the Triton target model pack; the
orchestrator unpacks), so the layout is defined once. Bytes are little-endian. The orchestrator keeps
rows packed (`PackedRows`, numpy views of the received bytes) and `on_common_support` hands the sampler
only the columns some row gives a non-zero probability.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Probability rows [R, width] held as their support: ``values`` [R, M] and ``index`` [R, M] token ids
    (entries with value 0 are padding), or ``index`` None for dense rows (M = width). numpy arrays, not
    torch tensors: the rows are a few hundred numbers at most, where numpy's per-call cost is a tenth of
    torch's (the orchestrator handles them once per round, on its event loop).

    ``shape`` and ``dim()`` answer as the dense tensor would, so shape checks need not care which it is.
    """

    values: np.ndarray  # float32 off the wire (any float dtype when wrapping a dense tensor)
    index: np.ndarray | None  # integer token ids
    width: int

    @classmethod
    def from_arrays(cls, values: np.ndarray, index: np.ndarray | None, width: int) -> PackedRows:
        """The inverse of pack_rows (ValueError if the parts do not fit); an index of None, or with no
        columns ([R, 0], as Triton carries "no index"), means dense rows. The arrays are kept, not copied
        (they may be read-only views of the received bytes)."""
        if values.ndim != 2:
            raise ValueError(f"values must have shape [R, M], got {list(values.shape)}")
        values = values.astype(np.float32, copy=False)
        if index is not None and index.ndim == 2 and index.shape[1] == 0 and index.shape[0] == values.shape[0]:
            index = None
        if index is None:
            if values.shape[1] != width:
                raise ValueError(f"dense rows must be {width} wide, got {values.shape[1]}")
            return cls(values, None, width)
        if index.shape != values.shape:
            raise ValueError(f"index {list(index.shape)} and values {list(values.shape)} differ in shape")
        if index.size:
            ordered = np.sort(index, axis=1)  # a few hundred ids at most: cheaper than a V-wide mask
            low, high = int(ordered[:, 0].min()), int(ordered[:, -1].max())
            if low < 0 or high >= width:
                raise ValueError(f"index must hold token ids in [0, {width}), got [{low}, {high}]")
            if np.any(ordered[:, 1:] == ordered[:, :-1]):
                raise ValueError("index repeats a token id within a row")
        return cls(values, index, width)

    @classmethod
    def of_dense(cls, rows: torch.Tensor) -> PackedRows:
        """Dense rows [R, V] as PackedRows: float32 and float64 kept as they are, other float dtypes widened
        to float64 (exactly)."""
        if rows.dim() != 2 or not rows.is_floating_point():
            raise ValueError(f"probability rows must be a float tensor [R, V], got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.detach().cpu()
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.to(torch.float64)
        return cls(rows.numpy(), None, rows.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.width)

    def dim(self) -> int:
        return 2

    def dense(self) -> torch.Tensor:
        """[R, width] as a tensor."""
        if self.index is None:
            return torch.from_numpy(np.array(self.values))
        out = np.zeros((self.values.shape[0], self.width), dtype=self.values.dtype)
        rows, entries = np.nonzero(self.values)
        out[rows, self.index[rows, entries]] = self.values[rows, entries]
        return torch.from_numpy(out)


def on_common_support(row_sets: Sequence[PackedRows], token_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Several sets of rows restricted to the same columns: the token ids to which some row gives a
    non-zero probability, plus ``token_ids``.

    Returns (columns [S] sorted token ids, one float64 array [R_i, S] per set, exact copies of the rows'
    values, 0 where a row gives a column no probability or is narrower than it). Costs O(V) bytes for a
    mask and O(entries) for the rest: no sort, no search.
    """
    width = max([rows.width for rows in row_sets] + [int(token_ids.max()) + 1 if token_ids.size else 0])
    mask = np.zeros(width, dtype=bool)
    mask[token_ids] = True
    for rows in row_sets:
        if rows.index is None:
            mask[: rows.width] |= (rows.values != 0).any(axis=0)
        else:
            mask[rows.index[rows.values != 0]] = True
    columns = np.flatnonzero(mask)
    slot = np.empty(width, dtype=np.intp)  # token id -> its column
    slot[columns] = np.arange(columns.size)
    restricted = []
    for rows in row_sets:
        out = np.zeros((rows.values.shape[0], columns.size), dtype=np.float64)
        if rows.index is None:
            inside = int(np.searchsorted(columns, rows.width))  # columns [0, inside) are < width
            out[:, :inside] = rows.values[:, columns[:inside]]
        else:
            r, e = np.nonzero(rows.values)
            out[r, slot[rows.index[r, e]]] = rows.values[r, e]
        restricted.append(out)
    return columns, restricted
