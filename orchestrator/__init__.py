"""The orchestrator: the stateless front door of specdec.

It owns the speculative loop. A backend calls ``specdec.v1.GenerationService``; for each generation the
orchestrator draws a sequence id, drives the draft service (bidirectional gRPC stream) and the target on
Triton (a KServe ``ModelStreamInfer`` stream) round by round, runs the exact rejection sampler between
them, and streams text back. It keeps no state between requests, so any number of replicas can sit behind
a load balancer.

Layout: ``clients`` (the interfaces the loop is written against), ``loop`` (the speculative loop, pure of
grpc/protobuf/tritonclient), ``draft_grpc`` / ``target_triton`` (the adapters; ``triton_messages``
encodes Triton's messages), ``text`` (incremental detokenization and stop strings), ``servicer``
(proto <-> dataclasses), ``server`` (bootstrap).
"""
