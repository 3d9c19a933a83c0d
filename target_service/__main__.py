"""``python -m target_service``: run Triton with the specdec target model until Ctrl-C or SIGTERM.

Every flag falls back to an environment variable (``SPECDEC_TARGET_<FLAG>``), then to the defaults of
``TritonServerConfig``, except the ports, which default to Triton's usual 8001 (gRPC), 8000 (HTTP) and
8002 (metrics); pass 0 for a free port.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from target_service.launcher import TritonServer, TritonServerConfig

log = logging.getLogger("target_service")

_DEFAULTS = {f.name: f.default for f in fields(TritonServerConfig)}
_DEFAULTS.update(grpc_port=8001, http_port=8000, metrics_port=8002)
_FLAGS: dict[str, tuple[type, str]] = {
    "host": (str, "address to bind gRPC, HTTP and metrics to"),
    "grpc_port": (int, "KServe v2 gRPC port (0 = free port)"),
    "http_port": (int, "KServe v2 HTTP port (0 = free port)"),
    "metrics_port": (int, "Prometheus metrics port (0 = free port)"),
    "model": (str, "model spec: 'smollm2' or a local Hugging Face folder"),
    "keep_layers": (str, "layer selection such as '0-13,17-29' ('' = all)"),
    "dtype": (str, "float32 | bfloat16 | float16"),
    "threads": (int, "torch intra-op threads in the model (0 = torch default)"),
    "max_sequences": (int, "live sequences (KV caches) per instance"),
    "idle_ttl_s": (float, "seconds before an idle cache is evicted"),
    "cache_dir": (str, "converted models and the Triton copy ('' = $SPECDEC_CACHE_DIR or ~/.cache/specdec)"),
    "instance_kind": (str, "KIND_CPU | KIND_GPU"),
    "instance_count": (int, "model instances (stub processes)"),
    "log_file": (str, "write Triton's log here ('' = a temporary file)"),
}


def parse_config(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> TritonServerConfig:
    """Flags, then SPECDEC_TARGET_* environment variables, then defaults."""
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(prog="python -m target_service", description=__doc__.splitlines()[0])
    for name, (kind, help_text) in _FLAGS.items():
        var = f"SPECDEC_TARGET_{name.upper()}"
        default: Any = kind(env[var]) if var in env else _DEFAULTS[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{help_text} [${var}; {default!r}]"
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log Triton's own lines")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.verbose:
        logging.getLogger("target_service.tritonserver").setLevel(logging.DEBUG)
        logging.getLogger().setLevel(logging.DEBUG)
    return TritonServerConfig(**{name: getattr(args, name) for name in _FLAGS})


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with TritonServer(config) as server:
        log.info(
            "serving model %r: grpc %s, http %s, metrics %s (Ctrl-C to stop)",
            server.model_name, server.grpc_url, server.http_url, server.metrics_url,
        )  # fmt: skip
        while not stop.wait(0.5):
            if not server.is_running():
                log.error("Triton exited on its own\n%s", server.log_tail())
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
