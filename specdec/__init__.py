"""specdec: speculative sampling (Chen et al. 2023) as a production gRPC service — the shared ground floor.

What every service stands on: the pure sampling math (`sampling`, `sampling_params`), probability rows on
the wire (`rows`), the contracts (`target_contract`, `proto`, `proposal`, the generated `v1`), the
per-sequence KV-cache engine and model loading (`engine`, `models`, `tiny`), server plumbing
(`grpc_server`, `config`, `startup`, `procs`, `hostport`, `tls`, `logs`). Nothing here imports a service
(docs/architecture.md).
"""
