"""The draft service's settings: one frozen dataclass, built once from flags with SPECDEC_DRAFT_* env fallbacks.

Why it exists: every knob of the draft service is declared here, with its default, exactly once; the
flags (``--max-sequences``) and environment variables (``SPECDEC_DRAFT_MAX_SEQUENCES``) are derived from the
fields by ``specdec.config``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from draft_service.drafters import LOOKUPS, needs_model, parse_drafters
from specdec.config import check_ports, parse_config
from specdec.models import SMOLLM2_SELF_DRAFT_LAYERS


@dataclass(frozen=True)
class DraftConfig:
    """Settings of the draft service (specdec.v1.DraftService)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=50052, metadata={"help": "port to bind; 0 picks a free port"})
    drafters: str = field(
        default="model,ngram,suffix,hybrid",
        metadata={"help": "drafters to offer, the default first: model, ngram (prompt lookup), suffix, hybrid "
                  "(suffix/ngram when it matches, else the model); without model or hybrid no model is loaded"},
    )
    model: str = field(default="smollm2", metadata={"help": "model folder, or 'smollm2' (the packaged SmolLM2-135M)"})
    keep_layers: str = field(
        default=SMOLLM2_SELF_DRAFT_LAYERS,
        metadata={"help": "self-draft: decoder layers to keep, e.g. '0-7' or '0-13,17-29'; '' keeps all"},
    )
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda:0"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads; 0 keeps torch's default"})
    max_sequences: int = field(
        default=64, metadata={"help": "most sequences with state, and most open Propose streams, at once"}
    )
    idle_ttl_s: float = field(default=300.0, metadata={"help": "evict a sequence's state after this many idle seconds"})
    max_num_draft_tokens: int = field(default=16, metadata={"help": "largest K a request may ask for"})
    max_forward_tokens: int = field(
        default=256,
        metadata={"help": "model drafter: tokens one forward may run; a longer prompt is caught up over several "
                  "forwards beside the other streams' drafting (0 = no limit; specdec/forward_budget.py)"},
    )
    kv_slot_tokens: int = field(
        default=512,
        metadata={"help": "model drafter: positions per pooled KV slot; max_sequences slots in one tensor, and the "
                  "streams that fit draft together, one attention call per layer; allocated at start: "
                  "max_sequences x this x the model's KV bytes per token, so size it to a GPU's memory (0 = no pool; "
                  "specdec/kv_cache.py)"},
    )
    hybrid_lookup: str = field(default="suffix", metadata={"help": "the model-free drafter hybrid asks first: ngram | suffix"})
    ngram_min: int = field(default=1, metadata={"help": "ngram: the shortest suffix of the context to look up"})
    ngram_max: int = field(default=4, metadata={"help": "ngram: the longest suffix of the context to look up"})
    suffix_depth: int = field(default=8, metadata={"help": "suffix: the longest suffix indexed"})
    suffix_min_score: float = field(
        default=0.3, metadata={"help": "suffix: stop proposing when the continuation's running frequency share drops below"}
    )
    suffix_cache_entries: int = field(
        default=200_000, metadata={"help": "suffix: suffixes kept from recent outputs at most (0 = no shared cache)"}
    )
    suffix_cache_ttl_s: float = field(default=3600.0, metadata={"help": "suffix: unused cache entries age out after this"})
    cache_dir: str = field(
        default="", metadata={"help": "where converted models live; '' = $SPECDEC_CACHE_DIR or ~/.cache/specdec"}
    )
    stall_timeout_s: float = field(
        default=30.0,
        metadata={"help": "health NOT_SERVING while the model's forward loop has had work this long without "
                  "finishing a forward (a stuck forward; draft_service/watchdog.py); 0 = off"},
    )
    grace_s: float = field(default=5.0, metadata={"help": "seconds open streams get to finish on shutdown"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port; 0 turns it off"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate of the gRPC port ('' = plaintext)"})
    tls_key: str = field(default="", metadata={"help": "PEM key of --tls-cert"})
    tls_client_ca: str = field(
        default="", metadata={"help": "PEM CA bundle; callers must present a certificate it signed ('' = not required)"}
    )

    def __post_init__(self) -> None:
        parse_drafters(self.drafters)
        check_ports(self, "port", "metrics_port")
        checks = [
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.max_sequences >= 1, f"max_sequences must be >= 1, got {self.max_sequences}"),
            (self.idle_ttl_s > 0, f"idle_ttl_s must be > 0, got {self.idle_ttl_s}"),
            (self.max_num_draft_tokens >= 1, f"max_num_draft_tokens must be >= 1, got {self.max_num_draft_tokens}"),
            (self.max_forward_tokens >= 0,
             f"max_forward_tokens must be >= 0 (0 = no limit), got {self.max_forward_tokens}"),
            (self.kv_slot_tokens >= 0, f"kv_slot_tokens must be >= 0 (0 = no pool), got {self.kv_slot_tokens}"),
            (self.grace_s >= 0, f"grace_s must be >= 0, got {self.grace_s}"),
            (self.stall_timeout_s >= 0, f"stall_timeout_s must be >= 0 (0 = off), got {self.stall_timeout_s}"),
            (self.hybrid_lookup in LOOKUPS, f"hybrid_lookup must be one of {list(LOOKUPS)}, got {self.hybrid_lookup!r}"),
            (1 <= self.ngram_min <= self.ngram_max, "need 1 <= ngram_min <= ngram_max"),
            (self.suffix_depth >= 1, f"suffix_depth must be >= 1, got {self.suffix_depth}"),
            (0 <= self.suffix_min_score <= 1, f"suffix_min_score must be in [0, 1], got {self.suffix_min_score}"),
            (self.suffix_cache_entries >= 0 and self.suffix_cache_ttl_s > 0, "need suffix_cache_entries >= 0, ttl > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def drafter_names(self) -> tuple[str, ...]:
        return parse_drafters(self.drafters)

    @property
    def loads_model(self) -> bool:
        return needs_model(self.drafter_names)


def load_config(argv: Sequence[str] | None = None) -> DraftConfig:
    """DraftConfig from command-line flags (``argv``; None = sys.argv) with SPECDEC_DRAFT_* env fallbacks."""
    return parse_config(DraftConfig, argv, prog="python -m draft_service", env_prefix="SPECDEC_DRAFT_")
