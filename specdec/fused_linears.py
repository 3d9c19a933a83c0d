"""The projections that read the same input run as one linear layer: q/k/v, and the MLP's gate/up.

Why it exists: a decode step of a small model is a string of small matrix products, each reading its
weight once, and a small product reads its weight slower than a big one (on this project's CPU, SmolLM2's
576x192 k projection streams its weight at ~8 GB/s, a 576x3072 product at ~20 GB/s; bench/README.md,
"Design measurements"). Serving engines therefore run the projections that share an input as one product
over their concatenated weights (vLLM's ``QKVParallelLinear`` and ``MergedColumnParallelLinear``): 4 products
per layer instead of 7, one SmolLM2 decode step ~6 % cheaper here (a step of 8 sequences ~1 %). On a GPU
it saves kernel launches.

How, without rewriting the model's attention or MLP: each projection of a group (``q_proj``, ``k_proj``,
``v_proj``; ``gate_proj``, ``up_proj``) becomes a `FusedProjection` that shares one `_Group`. The first
call runs the group's one linear and keeps its output; the calls that follow with the same input tensor
(the same object, unmodified: an inference tensor has no version to tell, and no model changes its input
in place between the calls) read their slice of it; the group forgets the output once every member has
read it. A call with any other input runs the group's linear on it, so the result never depends on the
order of the calls, only the saving does. The model's code calls the projections as before (transformers'
Llama, Mistral, Qwen2, ... call q, k, v, and gate, up, on one tensor each).

Applied by `specdec.models.load_model` to the models the stack serves (the target, the model drafter), before
`specdec.cpu_linear` packs the fused weights; the benchmark's Hugging Face peer keeps its model's own code.
Numerics: each output is the same dot product, summed as the kernel sums a wider product (~1e-6 relative).
Not thread-safe, as the model's forward is not.
"""

from __future__ import annotations

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group(torch.nn.Module):
    """One linear over the concatenated weights of a group's projections, and its last output."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        super().__init__()
        first = linears[0].weight
        self.members = len(linears)
        # skip_init: the weights are copied in below, so a big model's load does not draw random ones first
        self.linear = torch.nn.utils.skip_init(torch.nn.Linear, first.shape[1], sum(m.out_features for m in linears),
                                               bias=any(m.bias is not None for m in linears), device=first.device,
                                               dtype=first.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([m.weight for m in linears]))
            if self.linear.bias is not None:
                self.linear.bias.copy_(torch.cat([
                    m.bias if m.bias is not None else first.new_zeros(m.out_features) for m in linears
                ]))
        self.linear.requires_grad_(False)
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._reads = 0

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """The group's output for ``x``: kept from the call before when ``x`` is its input, unmodified."""
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if x is not self._input or version != self._version or self._output is None:
            self._input, self._version, self._output, self._reads = x, version, self.linear(x), 0
        output = self._output
        self._reads += 1
        if self._reads == self.members:  # every member has had its slice: hold nothing between steps
            self._input = self._output = None
        return output


class FusedProjection(torch.nn.Module):
    """A projection that is the columns ``start:stop`` of its group's output (a view)."""

    def __init__(self, group: _Group, start: int, stop: int) -> None:
        super().__init__()
        self.group = group
        self.start, self.stop = start, stop
        self.in_features, self.out_features = group.linear.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.read(x)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a fused group"


def fuse_projections(model: torch.nn.Module) -> int:
    """Fuse every group of `GROUPS` found among a module's children, in place; returns how many groups.
    A group is fused only when all its projections are plain ``nn.Linear`` of one input size, dtype and
    device."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, name, None) for name in names]
            if not all(type(m) is torch.nn.Linear for m in linears):
                continue
            weights = [m.weight for m in linears]
            if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
                continue
            group = _Group(linears)
            start = 0
            for name, linear in zip(names, linears):
                setattr(module, name, FusedProjection(group, start, start + linear.out_features))
                start += linear.out_features
            fused += 1
    return fused
