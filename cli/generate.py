"""`specdec generate`: a small client of GenerationService that prints the text and the statistics."""

from __future__ import annotations

import argparse
import sys

import grpc

from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2


def build_request(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    sampling = sampling_pb2.SamplingParams(top_k=args.top_k)
    for name in ("temperature", "top_p", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    request = generation_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling, stop=args.stop, drafter=args.drafter)
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    if args.num_draft_tokens is not None:
        request.num_draft_tokens = args.num_draft_tokens
    if getattr(args, "reproducible", None) is not None:
        request.reproducible = args.reproducible
    return request


def format_k(stats: generation_pb2.GenerationStats) -> str:
    """``K=4``, or under auto the Ks the rounds ran with: ``K=auto (rounds by K: 0:20 3:4; 18 off, 2 probes)``."""
    if not stats.auto_num_draft_tokens:
        return f"K={stats.num_draft_tokens}"
    by_k = " ".join(f"{k}:{n}" for k, n in enumerate(stats.rounds_by_k) if n)
    return f"K=auto (rounds by K: {by_k}; {stats.speculation_off_rounds} off, {stats.probe_rounds} probes)"


def format_stats(stats: generation_pb2.GenerationStats, finish_reason: int) -> str:
    tokens = stats.emitted_tokens
    per_token = stats.total_time_ms / tokens if tokens else 0.0
    drafter = f", drafter {stats.drafter}" if stats.drafter else ""
    return (
        f"finish: {generation_pb2.FinishReason.Name(finish_reason)} | tokens: {tokens} in {stats.rounds} rounds "
        f"({format_k(stats)}{drafter}) | accepted {stats.accepted_tokens}/{stats.drafted_tokens} "
        f"= {stats.acceptance_rate:.2f}, per position {list(stats.accepted_per_position)} | "
        f"{stats.total_time_ms:.0f} ms = {per_token:.1f} ms/token (draft {stats.draft_time_ms:.0f}, "
        f"target {stats.target_time_ms:.0f}, orchestrator {stats.orchestrator_time_ms:.0f}) | "
        f"draft fallback rounds {stats.draft_fallback_rounds}, target re-prefills {stats.target_reprefills} | "
        f"decoded by the target on its own: {stats.decoded_tokens} tokens in {stats.decoded_rounds} rounds"
    )


def generate_command(args: argparse.Namespace) -> int:
    request = build_request(args)
    with grpc.insecure_channel(args.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        try:
            if args.stream:
                last = None
                for chunk in stub.GenerateStream(request, timeout=args.timeout):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    last = chunk
                sys.stdout.write("\n")
                if last is not None:
                    sys.stderr.write(format_stats(last.stats, last.finish_reason) + "\n")
            else:
                response = stub.Generate(request, timeout=args.timeout)
                sys.stdout.write(response.text + "\n")
                sys.stderr.write(format_stats(response.stats, response.finish_reason) + "\n")
        except grpc.RpcError as err:
            sys.stderr.write(f"error: {err.code().name}: {err.details()}\n")
            return 1
    return 0
