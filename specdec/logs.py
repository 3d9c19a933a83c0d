"""Structured log lines about one sequence: every line starts with ``sequence_id=<id>``.

Why it exists: one generation touches three processes (orchestrator, draft service, Triton), and the
sequence id is the one key they share, so an operator greps ``sequence_id=123`` across all three logs.
`SequenceLogger` puts it first in the message (plain-text formatters) and also on the record as
``record.sequence_id`` (JSON formatters), the same way everywhere. More key=value pairs go in the message.

An error that ends a generation is logged by the server's error boundary, far from where the id is known:
``tag_sequence`` marks the exception on its way out, and the boundary prefixes its line with the id.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

_TAG = "_specdec_sequence_id"


class SequenceLogger(logging.LoggerAdapter):
    """``SequenceLogger(log, 123).warning("draft failed: %s", exc)`` -> ``sequence_id=123 draft failed: ...``."""

    def __init__(self, logger: logging.Logger, sequence_id: int) -> None:
        super().__init__(logger, {"sequence_id": sequence_id})

    @property
    def sequence_id(self) -> int:
        return int(self.extra["sequence_id"])  # type: ignore[index]

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}  # type: ignore[dict-item]
        return f"sequence_id={self.sequence_id} {msg}", kwargs


def tag_sequence(exc: BaseException, sequence_id: int | None) -> None:
    """Remember on ``exc`` the sequence it ended (the first tag wins: it is the innermost)."""
    if sequence_id and not hasattr(exc, _TAG):
        try:
            setattr(exc, _TAG, sequence_id)
        except AttributeError:  # exceptions with __slots__
            pass


def log_prefix(exc: BaseException) -> str:
    """``"sequence_id=<id> "`` if ``exc`` was tagged, else ``""``."""
    sequence_id = getattr(exc, _TAG, None)
    return f"sequence_id={sequence_id} " if sequence_id else ""
