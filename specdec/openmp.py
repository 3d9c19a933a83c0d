"""How long torch's OpenMP threads spin after a parallel region, for model processes sharing CPU cores.

Why it exists: torch's CPU wheels use GNU OpenMP (libgomp). After every parallel region its threads
busy-wait for ``GOMP_SPINCOUNT`` iterations (300,000 by default) before sleeping, so the next region
starts without a wake-up. In our stack the draft and the target take turns: when one finishes a round,
its OpenMP threads keep spinning on cores that the other model, the orchestrator and the gRPC threads
need right then. 20,000 keeps a forward's parallel regions back to back and lets go of the core within
tens of microseconds after it; 2,000 is too short (threads fall asleep between the layers' regions). The
measurements behind the choice are in bench/README.md, "Design measurements".

libgomp reads the variable once, when it loads (with torch), so it must be in the environment a model
process starts with: `cli.stack` and the Triton launcher put it in their children's environment, and
``python -m draft_service`` sets it for itself before importing torch. A value already set wins. GPU
models barely use OpenMP; the setting is harmless there.
"""

from __future__ import annotations

from collections.abc import MutableMapping

SPINCOUNT_VARIABLE = "GOMP_SPINCOUNT"
DEFAULT_SPINCOUNT = "20000"


def short_spin(env: MutableMapping[str, str]) -> None:
    """Set GOMP_SPINCOUNT in ``env`` unless it is set already."""
    env.setdefault(SPINCOUNT_VARIABLE, DEFAULT_SPINCOUNT)
