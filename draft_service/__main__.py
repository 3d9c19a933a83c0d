"""``python -m draft_service [flags]``: run the draft service until SIGINT/SIGTERM, then drain.

Why it exists: the deployable entry point; flags (``--help``) fall back to SPECDEC_DRAFT_* environment variables.
"""

from __future__ import annotations

import os

from specdec.openmp import short_spin

short_spin(os.environ)  # before anything imports torch, which loads OpenMP (specdec.openmp)

import asyncio  # noqa: E402
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from draft_service.config import DraftConfig, load_config  # noqa: E402
from draft_service.server import SERVICE_NAME, create_server  # noqa: E402
from specdec.grpc_server import serve_until_signal  # noqa: E402

log = logging.getLogger("draft_service")


async def serve(config: DraftConfig) -> None:
    server, port, handle = await create_server(config)
    log.info("draft service ready on %s:%d (health SERVING)", config.host, port)
    await serve_until_signal(server, handle.health, [SERVICE_NAME], config.grace_s, on_stop=handle.close)
    log.info("draft service stopped")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
