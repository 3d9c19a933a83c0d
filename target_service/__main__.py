"""``python -m target_service``: run Triton with the specdec target model until Ctrl-C or SIGTERM.

Every flag falls back to an environment variable (``SPECDEC_TARGET_<FLAG>``), then to the defaults in
``target_service.config`` (the ports default to Triton's usual 8001 gRPC, 8000 HTTP and 8002 metrics;
pass 0 for a free port).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from target_service.config import parse_target_config
from target_service.launcher import TritonServer

log = logging.getLogger("target_service")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_target_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if config.log_verbose > 0:
        logging.getLogger("target_service.tritonserver").setLevel(logging.DEBUG)
        logging.getLogger().setLevel(logging.DEBUG)
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
