"""The target's settings, declared once: the model's parameters and the Triton server's flags.

Why it exists: the same settings used to live in four places (config.pbtxt, the model's parameter parser,
the launcher and the CLI). Now `TargetModelParams` declares what the model reads from its config.pbtxt
``parameters`` (the launcher renders them, the model parses them back, a test holds the checked-in file to
these defaults), and `TritonServerConfig` holds them next to the server's own settings. Flags and their
``SPECDEC_TARGET_*`` environment fallbacks come from these fields (``python -m target_service --help``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.config import check_ports, parse_config
from specdec.lookup import ROW_COST
from specdec.models import parse_dtype, parse_layers

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class TargetModelParams:
    """The model's config.pbtxt ``parameters``: which model, and how much it may hold."""

    model: str = field(default="smollm2", metadata={"help": "model spec: 'smollm2' or a local Hugging Face folder"})
    keep_layers: str = field(default="", metadata={"help": "layer selection such as '0-13,17-29' ('' = all)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 | bfloat16 | float16"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads in the model (0 = torch's default)"})
    max_sequences: int = field(default=64, metadata={"help": "live sequences (KV caches) per model instance"})
    idle_ttl_s: float = field(default=300.0, metadata={"help": "seconds before an idle sequence's cache is evicted"})
    batch_wait_ms: float = field(
        default=20.0, metadata={"help": "how long the next forward may wait for sequences of the last one that are "
                                "on their way back (never for a lone caller; target_service/scheduler.py)"}
    )
    max_forward_tokens: int = field(
        default=256,
        metadata={"help": "tokens one forward may run: a longer prompt, or several, is prefilled over several "
                  "forwards beside the decodes in flight, never stalling them for longer (0 = no limit; "
                  "target_service/steps.py, fit)"},
    )
    kv_slot_tokens: int = field(
        default=512,
        metadata={"help": "positions per pooled KV slot: the model holds max_sequences slots in one tensor, and the "
                  "sequences that fit decode together, one attention call per layer; allocated at start: "
                  "max_sequences x this x the model's KV bytes per token, so size it to a GPU's memory (0 = no pool; "
                  "specdec/kv_cache.py)"},
    )
    lookup_row_cost: float = field(
        default=ROW_COST,
        metadata={"help": "a forward's cost per extra row over its cost alone (SmolLM2 on a CPU ~0.05, a GPU far "
                  "less): whether a decode's looked-up drafts pay in a batch (specdec/lookup.py)"},
    )
    prefix_cache_mb: float = field(
        default=64.0,
        metadata={"help": "MB of keys and values of prompt heads that different prompts shared (a system turn, an "
                  "instruction), copied into later prompts instead of recomputed (0 = off; SmolLM2 holds ~46 KB a "
                  "token, a 70B model's far more: size it to the heads; specdec/prefix_cache.py)"},
    )
    cache_dir: str = field(
        default="", metadata={"help": "converted models and the Triton copy ('' = $SPECDEC_CACHE_DIR or ~/.cache/specdec)"}
    )

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        parse_layers(self.keep_layers)  # fail at load time, not at the first request
        if self.threads < 0 or self.max_sequences < 1 or self.idle_ttl_s <= 0 or self.batch_wait_ms < 0:
            raise ValueError("need threads >= 0, max_sequences >= 1, idle_ttl_s > 0 and batch_wait_ms >= 0")
        if self.max_forward_tokens < 0:
            raise ValueError(f"max_forward_tokens must be >= 0 (0 = no limit), got {self.max_forward_tokens}")
        if self.kv_slot_tokens < 0:
            raise ValueError(f"kv_slot_tokens must be >= 0 (0 = no pool), got {self.kv_slot_tokens}")
        if self.lookup_row_cost < 0:
            raise ValueError(f"lookup_row_cost must be >= 0, got {self.lookup_row_cost}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0 = off), got {self.prefix_cache_mb}")

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> TargetModelParams:
        """Read ``{"parameters": {"model": {"string_value": "..."}, ...}}``; unknown keys are refused."""
        raw = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"unknown model parameters {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, text in raw.items():
            kind = type(known[name].default)
            try:
                values[name] = kind(text)
            except ValueError:
                raise ValueError(f"model parameter {name!r} must be a {kind.__name__}, got {text!r}") from None
        return cls(**values)

    def parameters(self) -> dict[str, str]:
        """The config.pbtxt ``parameters`` as strings (what `from_model_config` reads back)."""
        return {f.name: format(v, "g") if isinstance(v := getattr(self, f.name), float) else str(v)
                for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class TritonServerConfig:
    """specdec target: NVIDIA Triton (from the nvidia-pytriton wheel) serving the specdec_target model."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind gRPC, HTTP and metrics to"})
    grpc_port: int = field(default=8001, metadata={"help": "KServe v2 gRPC port (0 = a free port)"})
    http_port: int = field(default=8000, metadata={"help": "KServe v2 HTTP port (0 = a free port)"})
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus metrics port (0 = a free port)"})
    grpc_tls_cert: str = field(default="", metadata={"help": "PEM certificate of the gRPC port ('' = plaintext)"})
    grpc_tls_key: str = field(default="", metadata={"help": "PEM key of --grpc-tls-cert"})
    grpc_tls_client_ca: str = field(
        default="", metadata={"help": "PEM CA bundle; callers must present a certificate it signed ('' = not required)"}
    )
    params: TargetModelParams = field(default_factory=TargetModelParams)
    instance_kind: str = field(default="KIND_CPU", metadata={"help": "KIND_CPU | KIND_GPU"})
    instance_count: int = field(default=1, metadata={"help": "model instances (stub processes)"})
    max_batch_size: int = field(
        default=16, metadata={"help": "requests of different sequences per execute() (one batched forward)"}
    )
    ready_timeout_s: float = field(default=180.0, metadata={"help": "seconds to wait until Triton and the model are ready"})
    exit_timeout_s: int = field(
        default=5,
        metadata={"help": "Triton's --exit-timeout-secs: it counts every open sequence as in flight, so keep it short"},
    )
    stop_grace_s: float = field(default=10.0, metadata={"help": "after SIGTERM, SIGKILL Triton and its stubs after this"})
    liveness_interval_s: float = field(
        default=5.0,
        metadata={"help": "seconds between probes of the model itself through Triton's gRPC port (0 = off; under "
                  "TLS, off unless --liveness-tls-ca is given; target_service/liveness.py)"},
    )
    liveness_tls_ca: str = field(
        default="",
        metadata={"help": "PEM CA bundle that signed --grpc-tls-cert: the probes trust it, and under mutual TLS "
                  "present --grpc-tls-cert as their own certificate, which must then carry clientAuth and come "
                  "from --grpc-tls-client-ca ('' = no probes under TLS)"},
    )
    liveness_server_name: str = field(
        default="", metadata={"help": "name the probes check --grpc-tls-cert against ('' = --host)"}
    )
    liveness_timeout_s: float = field(
        default=30.0,
        metadata={"help": "a probe unanswered this long means the model is stuck: its threads' stacks are logged "
                  "and Triton is restarted on the same ports"},
    )
    log_file: str = field(default="", metadata={"help": "write Triton's log here ('' = a temporary file)"})
    log_verbose: int = field(default=0, metadata={"help": "Triton's --log-verbose (> 0 also logs Triton's own lines)"})

    def __post_init__(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {self.instance_kind!r}")
        check_ports(self, "grpc_port", "http_port", "metrics_port")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ValueError("give both grpc_tls_cert and grpc_tls_key, or neither")
        if self.grpc_tls_client_ca and not self.grpc_tls_cert:
            raise ValueError("grpc_tls_client_ca (mutual TLS) needs grpc_tls_cert and grpc_tls_key")
        if self.liveness_tls_ca and not self.grpc_tls_cert:
            raise ValueError("liveness_tls_ca is for a TLS gRPC port: it needs grpc_tls_cert and grpc_tls_key")
        if self.liveness_server_name and not self.liveness_tls_ca:
            raise ValueError("liveness_server_name is checked over TLS only: it needs liveness_tls_ca")
        for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca", "liveness_tls_ca"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: no such file {getattr(self, name)!r}")
        if self.liveness_interval_s < 0 or self.liveness_timeout_s <= 0:
            raise ValueError("liveness_interval_s must be >= 0 and liveness_timeout_s > 0")
        if self.instance_count < 1 or self.max_batch_size < 1 or self.exit_timeout_s < 0:
            raise ValueError("instance_count and max_batch_size must be >= 1, exit_timeout_s >= 0")

    @property
    def cache_root(self) -> Path:
        return Path(self.params.cache_dir or os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec")


def parse_target_config(argv: Sequence[str] | None = None) -> TritonServerConfig:
    """Flags > SPECDEC_TARGET_* environment > defaults."""
    return parse_config(TritonServerConfig, argv, prog="python -m target_service", env_prefix="SPECDEC_TARGET_")
