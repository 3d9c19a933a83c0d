"""The orchestrator's settings: one frozen dataclass, built once from flags with SPECDEC_ORCHESTRATOR_* env fallbacks.

Every default is defined here and nowhere else; ``python -m orchestrator --help`` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specdec.config import check_ports, parse_config
from specdec.target_contract import MAX_LOOKUP


@dataclass(frozen=True)
class OrchestratorConfig:
    """specdec orchestrator: the GenerationService front end of speculative sampling."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free port)"})
    draft_address: str = field(
        default="127.0.0.1:50052",
        metadata={"help": "draft replicas: comma-separated host:port; a name means every address it resolves to, "
                  "re-resolved (a headless Service) ('' = no draft: target-only)"},
    )
    triton_url: str = field(
        default="127.0.0.1:8001",
        metadata={"help": "Triton replicas (gRPC): comma-separated host:port; a name means every address it "
                  "resolves to, re-resolved (a headless Service)"},
    )
    triton_model: str = field(default="specdec_target", metadata={"help": "Triton model name of the target"})
    tokenizer: str = field(default="smollm2", metadata={"help": "model spec whose tokenizer (the target's) to load"})
    cache_dir: str = field(
        default="", metadata={"help": "converted-model cache ('' = $SPECDEC_CACHE_DIR or ~/.cache/specdec)"}
    )
    default_num_draft_tokens: str = field(
        default="auto",
        metadata={"help": "K when the request leaves it unset: 'auto' (chosen per round from measured acceptance "
                  "and costs, 0 when drafting does not pay) or a fixed number"},
    )
    max_num_draft_tokens: int = field(default=16, metadata={"help": "largest K a request may ask for, and auto may choose"})
    k_probe_rounds: int = field(
        default=16, metadata={"help": "auto K: rounds with speculation off before one round tries drafting again"}
    )
    k_probe_rounds_max: int = field(
        default=256, metadata={"help": "auto K: the longest wait between such probes (each that does not pay doubles it)"}
    )
    k_probe_budget: float = field(
        default=0.02, metadata={"help": "auto K: probes may add at most this share to the time spent with speculation "
                                "off (an expensive draft probes less often than every k_probe_rounds)"}
    )
    default_max_new_tokens: int = field(
        default=64, metadata={"help": "max_new_tokens when the request leaves it unset"}
    )
    max_new_tokens_limit: int = field(default=1024, metadata={"help": "largest max_new_tokens a request may ask for"})
    context_length: int = field(
        default=0, metadata={"help": "prompt + generated tokens at most (0 = from the model config/tokenizer)"}
    )
    max_prompt_chars: int = field(default=32768, metadata={"help": "longest prompt text accepted, in characters"})
    max_stop_strings: int = field(default=8, metadata={"help": "most stop strings per request"})
    max_stop_chars: int = field(default=128, metadata={"help": "longest stop string, in characters"})
    draft_round_timeout_s: float = field(
        default=5.0, metadata={"help": "a draft round slower than this moves the generation to another draft replica, or with none "
                         "finishes it target-only (0 = no limit)"}
    )
    target_steps: int = field(
        default=8,
        metadata={"help": "tokens the target decodes on its own in a round without drafts (speculation off): "
                  "one request instead of one per token; 1 = every token is its own round"},
    )
    target_lookup: int = field(
        default=16,
        metadata={"help": "in those rounds, draft tokens each target forward may also verify, looked up in the "
                  "sequence's own tokens next to the model (specdec/lookup.py; not for requests with K = 0); "
                  "0 = one token per forward"},
    )
    max_target_reprefills: int = field(
        default=2, metadata={"help": "times per generation the target's lost cache is re-sent before failing"}
    )
    draft_breaker_failures: int = field(
        default=3, metadata={"help": "consecutive failures on a draft replica that open its breaker (0 = never)"}
    )
    draft_breaker_cooldown_s: float = field(
        default=10.0, metadata={"help": "seconds an open circuit breaker skips its draft replica before a trial round"}
    )
    target_connect_timeout_s: float = field(
        default=3.0,
        metadata={"help": "how long a request waits for a connection to Triton before UNAVAILABLE (keep > 1 s, "
                  "the reconnect backoff cap, so a Triton that is back is always found)"},
    )
    target_stall_timeout_s: float = field(
        default=60.0,
        metadata={"help": "a target round unanswered this long means its Triton's model is stuck (Triton still "
                  "reports itself ready): the replica is ejected, its generations re-sent to another, and it is "
                  "readmitted once its model answers again; keep it above the slowest real round (a long "
                  "prompt under full load); 0 = wait for the caller's deadline"},
    )
    resolve_interval_s: float = field(
        default=30.0, metadata={"help": "seconds between resolutions of the draft and Triton names"}
    )
    health_check_interval_s: float = field(
        default=2.0, metadata={"help": "seconds between health checks of each draft and Triton replica"}
    )
    health_check_timeout_s: float = field(default=2.0, metadata={"help": "a slower health check failed"})
    health_check_failures: int = field(
        default=2, metadata={"help": "failed health checks in a row that eject a replica (a failed connect ejects at once)"}
    )
    tls_cert: str = field(
        default="", metadata={"help": "PEM certificate of the public port ('' = plaintext)"}
    )
    tls_key: str = field(default="", metadata={"help": "PEM key of --tls-cert"})
    tls_client_ca: str = field(
        default="", metadata={"help": "PEM CA bundle; callers must present a certificate it signed ('' = not required)"}
    )
    draft_tls_ca: str = field(
        default="", metadata={"help": "PEM CA bundle that signed the draft replicas' certificates ('' = plaintext)"}
    )
    draft_tls_cert: str = field(default="", metadata={"help": "PEM client certificate presented to the drafts"})
    draft_tls_key: str = field(default="", metadata={"help": "PEM key of --draft-tls-cert"})
    draft_tls_server_name: str = field(
        default="", metadata={"help": "name the drafts' certificates must carry ('' = the name in --draft-address)"}
    )
    triton_tls_ca: str = field(
        default="", metadata={"help": "PEM CA bundle that signed the Triton replicas' certificates ('' = plaintext)"}
    )
    triton_tls_cert: str = field(default="", metadata={"help": "PEM client certificate presented to Triton"})
    triton_tls_key: str = field(default="", metadata={"help": "PEM key of --triton-tls-cert"})
    triton_tls_server_name: str = field(
        default="", metadata={"help": "name Triton's certificates must carry ('' = the name in --triton-url)"}
    )
    max_request_bytes: int = field(
        default=1024 * 1024,
        metadata={"help": "largest request message accepted; gRPC refuses larger ones with RESOURCE_EXHAUSTED"},
    )
    grace_s: float = field(default=5.0, metadata={"help": "seconds in-flight generations get to finish on shutdown"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics HTTP port (0 = disabled)"})

    def __post_init__(self) -> None:
        check_ports(self, "port", "metrics_port")
        default = self.default_k
        if self.max_num_draft_tokens < 0 or (default is not None and not 0 <= default <= self.max_num_draft_tokens):
            raise ValueError("default_num_draft_tokens must be 'auto' or in [0, max_num_draft_tokens]")
        if not 1 <= self.k_probe_rounds <= self.k_probe_rounds_max:
            raise ValueError("need 1 <= k_probe_rounds <= k_probe_rounds_max")
        if not 0 < self.k_probe_budget <= 1:
            raise ValueError(f"k_probe_budget must be in (0, 1], got {self.k_probe_budget}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("need 1 <= default_max_new_tokens <= max_new_tokens_limit")
        if self.target_steps < 1:
            raise ValueError(f"target_steps must be >= 1, got {self.target_steps}")
        if not 0 <= self.target_lookup <= MAX_LOOKUP:
            raise ValueError(f"target_lookup must be in [0, {MAX_LOOKUP}], got {self.target_lookup}")
        if self.context_length < 0 or self.draft_round_timeout_s < 0 or self.max_target_reprefills < 0:
            raise ValueError("context_length, draft_round_timeout_s and max_target_reprefills must be >= 0")
        if self.draft_breaker_failures < 0 or self.draft_breaker_cooldown_s < 0:
            raise ValueError("draft_breaker_failures and draft_breaker_cooldown_s must be >= 0")
        if self.target_connect_timeout_s <= 0 or self.max_request_bytes < 1024:
            raise ValueError("target_connect_timeout_s must be > 0 and max_request_bytes >= 1024")
        if self.target_stall_timeout_s < 0:
            raise ValueError(f"target_stall_timeout_s must be >= 0 (0 = off), got {self.target_stall_timeout_s}")
        if not self.triton_url.strip():
            raise ValueError("triton_url must name at least one Triton replica")


    @property
    def default_k(self) -> int | None:
        """The default K: None for auto."""
        text = self.default_num_draft_tokens.strip().lower()
        if text == "auto":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"default_num_draft_tokens must be 'auto' or an integer, got {text!r}") from None


def parse_orchestrator_config(argv: Sequence[str] | None = None) -> OrchestratorConfig:
    """Flags > SPECDEC_ORCHESTRATOR_* environment > defaults."""
    return parse_config(OrchestratorConfig, argv, prog="python -m orchestrator", env_prefix="SPECDEC_ORCHESTRATOR_")
