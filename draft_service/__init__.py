"""The draft service: proposes draft tokens for the orchestrator, one round at a time, per sequence.

Why it exists: speculative sampling needs a cheap guess of the target's next tokens. The draft service
runs apart from the target (on a small GPU, or CPU-only when it offers only model-free drafters), keeps
each sequence's context between rounds, and offers several drafters: a small model, prompt lookup, suffix
drafting and a hybrid. The orchestrator drives it over ``specdec.v1.DraftService``.

Layout: ``core`` (the round, pure of gRPC), ``drafters/`` (one module per drafter, and the model's batched
step loop), ``build`` (assembling what a config offers), ``servicer`` (proto <-> dataclasses at the edge),
``server`` (bootstrap: ``create_server``), ``metrics`` (Prometheus), ``config`` (flags/env), ``__main__``.
"""
