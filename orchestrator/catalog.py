"""The drafters the draft service offers, as this orchestrator last heard: requests are checked against it.

Why it exists: a request may name a drafter (``GenerateRequest.drafter``); a name the deployment does not
offer must be refused at the orchestrator's edge with INVALID_ARGUMENT, not turned into a silent
target-only generation when the draft service refuses it. The list comes from the draft service itself
(``GetStats.drafters``), fetched at startup and refreshed in the background, so the orchestrator has no
second copy of the draft service's configuration. While it is unknown (the draft service not reached yet),
names are let through: the draft service then refuses an unknown one and the generation goes target-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from orchestrator.clients import DraftClient, DraftError

log = logging.getLogger(__name__)


class DrafterCatalog:
    """The offered drafters (default first), or None while unknown; ``check`` refuses a name not offered."""

    def __init__(self, client: DraftClient | None, refresh_s: float = 30.0) -> None:
        self._client = client
        self._refresh_s = refresh_s
        self.offered: tuple[str, ...] | None = None
        self._task: asyncio.Task | None = None

    def check(self, name: str) -> None:
        """ValueError naming the field if ``name`` (non-empty) is not a drafter this deployment offers."""
        if not name:
            return
        if self._client is None:
            raise ValueError(f"drafter: this deployment runs no draft service, so it offers no drafter ({name!r})")
        if self.offered is not None and name not in self.offered:
            raise ValueError(f"drafter: must be one of {list(self.offered)} (or empty for {self.offered[0]!r}), got {name!r}")

    async def refresh(self) -> None:
        if self._client is None:
            return
        try:
            offered = await self._client.drafters()
        except DraftError as exc:
            log.debug("the draft service's drafters are unknown for now: %s", exc)
            return
        if offered and offered != self.offered:
            log.info("the draft service offers the drafters %s (default %s)", list(offered), offered[0])
            self.offered = offered

    def start(self) -> None:
        """Refresh in the background until `close`."""
        if self._client is not None and self._task is None:
            self._task = asyncio.ensure_future(self._keep_refreshing())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _keep_refreshing(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s if self.offered is not None else min(self._refresh_s, 1.0))
