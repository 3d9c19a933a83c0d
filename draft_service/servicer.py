"""specdec.v1.DraftService on grpcio's thread-per-RPC server: protobuf <-> dataclasses at the edge.

Why it exists: it is the only place that sees protobuf types. Each RPC converts its request into the
core's dataclasses (`draft_service.core`), runs the round on the stream's own thread (a model drafter's
forwards join the step loop shared by every stream), and converts the result back. Errors go through one table
(``ERROR_TABLE``) via ``specdec.grpc_server.error_boundary``, which also counts every RPC.

A Propose stream owns its sequence and a server thread: at most ``max_streams`` streams are open at once
(more get RESOURCE_EXHAUSTED at once, so the threads kept for the other RPCs stay free), every request
must carry the stream's sequence_id, a second open stream on the same id is refused, and the cache is
released however the stream ends (completion, client cancel, deadline, error, server shutdown).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from draft_service.core import DraftCore, ProposeRound
from draft_service.drafters.steps import JobCancelled
from draft_service.metrics import DraftMetrics
from specdec.grpc_server import ErrorTable, error_boundary
from specdec.logs import SequenceLogger, tag_sequence
from specdec.proposal import Proposal
from specdec.proto import sampling_from_pb
from specdec.rows import encode_rows
from specdec.sequences import CapacityError, SequenceNotFoundError
from specdec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)

ERROR_TABLE: ErrorTable = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (SequenceNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (JobCancelled, grpc.StatusCode.CANCELLED),  # its stream was cancelled mid-round: nobody to tell
)


def round_from_pb(pb: draft_pb2.ProposeRequest) -> ProposeRound:
    return ProposeRound(
        sequence_id=pb.sequence_id,
        keep_length=pb.keep_length,
        append_token_ids=tuple(pb.append_token_ids),
        num_draft_tokens=pb.num_draft_tokens,
        sampling=sampling_from_pb(pb.sampling),
        seed=pb.seed,
        drafter=pb.drafter,
        coupled=pb.coupled,
    )


def proposal_to_pb(proposal: Proposal, vocab_size: int) -> draft_pb2.ProposeResponse:
    q_probs, q_index = (b"", b"") if proposal.q is None else encode_rows(proposal.q)
    return draft_pb2.ProposeResponse(
        draft_token_ids=proposal.token_ids,
        q_probs=q_probs,
        q_index=q_index,
        vocab_size=vocab_size,
        cache_length=proposal.cache_length,
    )


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    """The DraftService RPCs over a Drafter; safe to call from many server threads at once."""

    def __init__(self, core: DraftCore, metrics: DraftMetrics, max_streams: int) -> None:
        self._core = core
        self._metrics = metrics
        self._max_streams = max_streams
        self._streams_lock = threading.Lock()
        self._open_streams = 0
        self._streaming: set[int] = set()  # sequence ids owned by an open Propose stream

    def observe_rpc(self, method: str, code: grpc.StatusCode) -> None:
        """Every RPC's final status (called by the error boundary)."""
        self._metrics.count_request(method, code)

    @error_boundary(ERROR_TABLE, log)
    def Propose(
        self, request_iterator: Iterator[draft_pb2.ProposeRequest], context: grpc.ServicerContext
    ) -> Iterator[draft_pb2.ProposeResponse]:
        self._open()
        sequence_id: int | None = None
        try:
            for request in request_iterator:
                round_ = round_from_pb(request)
                if sequence_id is None:
                    self._claim(round_.sequence_id)
                    sequence_id = round_.sequence_id
                elif round_.sequence_id != sequence_id:
                    raise ValueError(
                        f"sequence_id must be the same on every request of a stream: "
                        f"this stream is {sequence_id}, got {round_.sequence_id}"
                    )
                start = time.perf_counter()
                proposal = self._core.propose(round_, context.is_active)
                response = proposal_to_pb(proposal, self._core.vocab_size)
                self._metrics.observe_round(
                    time.perf_counter() - start, round_.drafter or self._core.default, len(proposal.token_ids),
                    len(response.q_probs) + len(response.q_index),
                )
                yield response
        except BaseException as exc:
            tag_sequence(exc, sequence_id)  # the error boundary's line names the sequence
            raise
        finally:
            self._close(sequence_id)

    @error_boundary(ERROR_TABLE, log)
    def Release(self, request: draft_pb2.ReleaseRequest, context: grpc.ServicerContext) -> draft_pb2.ReleaseResponse:
        if request.sequence_id == 0:
            raise ValueError("sequence_id must be non-zero")
        return draft_pb2.ReleaseResponse(released=self._core.release(request.sequence_id))

    @error_boundary(ERROR_TABLE, log)
    def GetStats(self, request: draft_pb2.GetStatsRequest, context: grpc.ServicerContext) -> draft_pb2.GetStatsResponse:
        stats = self._core.stats()
        return draft_pb2.GetStatsResponse(
            live_sequences=stats.live_sequences, max_sequences=stats.max_sequences, vocab_size=stats.vocab_size,
            drafters=stats.drafters, suffix_cache_entries=stats.suffix_cache_entries,
            suffix_cache_bytes=stats.suffix_cache_bytes, kv_bytes=stats.kv_bytes,
        )

    def _open(self) -> None:
        """Admit a stream, or refuse it while ``max_streams`` are open (each holds a server thread)."""
        with self._streams_lock:
            if self._open_streams >= self._max_streams:
                raise CapacityError(
                    f"the draft service is at capacity: {self._open_streams} Propose streams are open "
                    f"(max_sequences {self._max_streams}); retry later or add replicas"
                )
            self._open_streams += 1
        self._metrics.open_streams.inc()

    def _claim(self, sequence_id: int) -> None:
        if sequence_id == 0:
            raise ValueError("sequence_id must be non-zero")
        with self._streams_lock:
            if sequence_id in self._streaming:
                raise ValueError(f"sequence_id {sequence_id} is already used by another open Propose stream")
            self._streaming.add(sequence_id)

    def _close(self, sequence_id: int | None) -> None:
        with self._streams_lock:
            self._open_streams -= 1
            if sequence_id is not None:
                self._streaming.discard(sequence_id)
        self._metrics.open_streams.dec()
        if sequence_id is not None and self._core.release(sequence_id):
            SequenceLogger(log, sequence_id).debug("the Propose stream ended: cache released")
