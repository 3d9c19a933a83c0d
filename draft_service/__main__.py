"""``python -m draft_service [flags]``: run the draft service until SIGINT/SIGTERM, then drain.

Why it exists: the deployable entry point; flags (``--help``) fall back to SPECDEC_DRAFT_* environment variables.
A SIGINT/SIGTERM while it starts (loading a model can take a while) stops it there and exits 0
(`specdec.startup.StopSignals`).
"""

from __future__ import annotations

import os

from specdec.openmp import DRAFT_SPINCOUNT, set_spin

set_spin(os.environ, DRAFT_SPINCOUNT)  # before anything imports torch, which loads OpenMP (specdec.openmp)

import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from draft_service.config import DraftConfig, load_config  # noqa: E402
from draft_service.server import create_server  # noqa: E402
from specdec.gc_freeze import freeze_startup_objects  # noqa: E402
from specdec.hostport import join_host_port  # noqa: E402
from specdec.startup import StopSignals, exit_if_startup_fails  # noqa: E402

log = logging.getLogger("draft_service")


def serve(config: DraftConfig) -> None:
    """Serve until SIGINT/SIGTERM, then drain: NOT_SERVING, open streams get ``grace_s`` seconds. A signal
    while it starts ends the start where it is: ``create_server`` stops what it had started."""
    signals = StopSignals(log)
    with exit_if_startup_fails(log):
        handle = create_server(config)
    try:
        signals.serving()
        freeze_startup_objects(log)
        log.info("draft service ready on %s (health SERVING)", join_host_port(config.host, handle.port))
        signals.stop.wait()
    finally:
        log.info("stopping: draining for up to %.1f s", config.grace_s)
        handle.stop(config.grace_s)
        log.info("draft service stopped")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config)


if __name__ == "__main__":
    main()
