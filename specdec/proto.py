"""`SamplingParams` to and from protobuf: the one conversion every gRPC edge of specdec uses.

Why it exists: the sampling settings enter two servers over protobuf (the orchestrator's public API and
the draft service's Propose stream) and leave one client (the orchestrator's draft adapter). One pair of
functions means one reading of "unset" and one wording of every refusal.
"""

from __future__ import annotations

from specdec.sampling_params import SamplingParams
from specdec.v1 import sampling_pb2


def sampling_from_pb(pb: sampling_pb2.SamplingParams) -> SamplingParams:
    """Unset temperature and top_p mean 1.0, top_k 0 means off; the seed is not part of SamplingParams.

    Raises ValueError naming the field (``sampling.top_p must be in (0, 1] ...``)."""
    try:
        return SamplingParams(
            temperature=float(pb.temperature) if pb.HasField("temperature") else 1.0,
            top_k=int(pb.top_k),
            top_p=float(pb.top_p) if pb.HasField("top_p") else 1.0,
        )
    except ValueError as exc:
        raise ValueError(f"sampling.{exc}") from None  # SamplingParams' messages start with the field name


def sampling_to_pb(params: SamplingParams, seed: int | None = None) -> sampling_pb2.SamplingParams:
    """The message for ``params`` (every field set explicitly, so nothing depends on the far side's defaults)."""
    pb = sampling_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if seed is not None:
        pb.seed = seed
    return pb
