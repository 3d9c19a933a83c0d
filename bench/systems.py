"""The systems a single-stream phase times, behind one call: run this arm on this prompt, get a Record.

Why this module exists: the phases interleave our stack and Hugging Face generation by generation (the
machine's speed drifts over minutes; everything compared must see the same minutes), so they need one way
to run any arm. Around target-only generations the Triton model's own time is read too, to tell what
serving costs per token from what the model costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from bench import client
from bench.arms import HF, TARGET_ONLY, Arm, Record
from bench.peer import Peer
from specdec.sampling import SamplingParams
from specdec.v1 import generation_pb2_grpc


class Systems:
    """Our stack (through its public API) and, unless skipped, the HF peer in this process."""

    def __init__(self, stub: generation_pb2_grpc.GenerationServiceStub, servers: client.ServerReader,
                 peer: Peer | None, max_new_tokens: int) -> None:
        self.stub, self.servers, self.peer, self.max_new_tokens = stub, servers, peer, max_new_tokens

    def run(self, arm: Arm, prompt_ids: Sequence[int], params: SamplingParams, seed: int,
            max_new_tokens: int | None = None, **labels: object) -> Record:
        """One generation of ``arm``; ``labels`` fill the record's phase, workload, mode, item."""
        budget = max_new_tokens or self.max_new_tokens
        if arm.system == HF:
            if self.peer is None:
                raise ValueError("the HF peer is skipped (--skip-peer)")
            return self.peer.run(arm, prompt_ids, params, budget, seed, **labels)
        before = self.servers.triton() if arm == TARGET_ONLY else None
        response, wall_ms = client.generate(self.stub, client.request(arm, prompt_ids, params, budget, seed))
        record = client.to_record(response, wall_ms, arm=arm.label, **labels)
        if before is not None:  # what Triton itself spent: the serving cost is the rest
            spent = self.servers.triton() - before
            record = dataclasses.replace(record, extra={"triton_model_ms": spent.forward_s * 1e3})
        return record
