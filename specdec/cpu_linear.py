"""Linear layers on the CPU through oneDNN, with each weight packed once when the model loads.

Why it exists: stock PyTorch runs a CPU ``nn.Linear`` through MKL's sgemm, which is slow for the few rows a
serving step has: a decode step has one row per sequence, a verification K+1. oneDNN with a weight reordered
once into its blocked layout (the kernels PyTorch's own CPU compiler, Inductor, picks) runs those shapes
2-4x faster. On this project's CPU (bench/README.md, "Design measurements"), one SmolLM2-135M step: 1 token
38.8 -> 22.0 ms, 9 tokens (a K=8 verification) 63.8 -> 24.7 ms, 8 sequences of 1 token 61.9 -> 30.7 ms,
a 300-token prefill 520 -> 273 ms. That changes what speculation and batching cost: verifying K+1 tokens
now costs little more than one.

Where: `specdec.models.load_model` packs every ``nn.Linear`` of a model it loads on the CPU (the target, the
model drafter, the benchmark's Hugging Face peer alike), unless told not to. GPUs keep their own kernels.
The packed copy replaces the weight (a tied output embedding keeps its input embedding, so that one weight
is held twice). Row counts are bucketed (`bucket`), so oneDNN keeps a bounded set of kernels. Numerics: the
same products summed in another order, ~1e-4 on SmolLM2's logits; each row's result does not depend on the
other rows of the batch (tested on our shapes; MKL's does), so a sequence's rows are the same whether it
runs alone or batched with others.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU can run packed linears of ``dtype``."""
    if dtype not in _DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bucket(rows: int) -> int:
    """The row count a linear runs at: exact up to 16 (decode and verification steps), then rounded up to
    4 sizes per power of two (at most 25% padding; 4 sizes per doubling of the prompt length)."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 3)  # a quarter of the power of two below rows
    return -(-rows // step) * step


class PackedLinear(torch.nn.Module):
    """``nn.Linear``'s forward on a weight packed for oneDNN; inference only (no gradients, no ``weight``)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], as ``nn.Linear`` (same dtype rules: x must match).
        The rows are zero-padded to `bucket` rows: oneDNN keeps a kernel per row count it has seen
        (~1 MB each), so a server fed every prompt length would grow without bound."""
        if x.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} input, got {x.dtype}")
        rows = x.reshape(-1, self.in_features)  # [N, in]
        n = rows.shape[0]
        padded = bucket(n)
        if padded != n:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padded - n))  # [padded, in]
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")[:n]  # [N, out]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` on the CPU by a `PackedLinear`, in place; returns how many. Linears on
    another device, or of a dtype this build and CPU cannot run packed, stay as they are."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.device.type == "cpu" and available(child.weight.dtype):
                setattr(module, name, PackedLinear(child))
                replaced += 1
    return replaced
