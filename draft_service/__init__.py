"""The draft service: a small causal LM behind a gRPC API that proposes K draft tokens per round.

Why it exists: speculative sampling needs a cheap model that guesses the target's next tokens. It runs on
its own (cheaper) hardware and keeps one KV cache per sequence id, so each round only feeds the tokens
appended since the last one and rolls back the drafts the target rejected. The orchestrator drives it
over ``specdec.v1.DraftService`` (protos/specdec/v1/draft.proto).

Layout: ``drafter`` (the draft round, pure of gRPC), ``servicer`` (proto <-> dataclasses at the edge),
``server`` (bootstrap: ``create_server``), ``metrics`` (Prometheus), ``config`` (flags/env), ``__main__``.
"""
