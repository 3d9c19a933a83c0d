"""``python -m orchestrator [flags]``: run the orchestrator until SIGINT/SIGTERM, then drain gracefully.

A SIGINT/SIGTERM while it starts (loading the tokenizer, reaching its replicas) stops it there and exits 0
(`specdec.startup.StopSignals`), instead of a KeyboardInterrupt traceback or a death by signal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from orchestrator.config import parse_orchestrator_config
from orchestrator.server import create_server
from orchestrator.servicer import SERVICE_NAME
from specdec.gc_freeze import freeze_startup_objects
from specdec.grpc_server import serve_until_signal
from specdec.hostport import join_host_port
from specdec.startup import StopSignals, exit_if_startup_fails

log = logging.getLogger("orchestrator")


async def _serve(argv: Sequence[str] | None, signals: StopSignals) -> None:
    config = parse_orchestrator_config(argv)
    with exit_if_startup_fails(log):
        server, port = await create_server(config)
    signals.serving()  # from here on the event loop's own handlers stop it (serve_until_signal)
    freeze_startup_objects(log)
    log.info("serving specdec.v1.GenerationService on %s", join_host_port(config.host, port))
    await serve_until_signal(server, server.health, [SERVICE_NAME], config.grace_s, signals.stop)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signals = StopSignals(log)
    asyncio.run(_serve(argv, signals))


if __name__ == "__main__":
    main()
