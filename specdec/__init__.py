"""specdec: speculative sampling (Chen et al. 2023) as a production gRPC service.

Shared pieces live here: the pure sampling math (`specdec.sampling`), the model loading used by both the
draft and the target (`specdec.models`), the per-sequence KV-cache engine (`specdec.engine`), gRPC
server plumbing (`specdec.grpc_server`), the generated protobuf code (`specdec.v1`) and the CLI.
"""
