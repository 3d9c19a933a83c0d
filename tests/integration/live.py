"""How tests see inside the running services: live sequences (the draft service's GetStats RPC and Triton's
Prometheus metric) and what a process logged about its startup."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable

import grpc

from specdec.v1 import draft_pb2, draft_pb2_grpc

_FROZEN = re.compile(r"startup done: (\d+) objects moved out of the garbage collector's reach")
_TRITON_LIVE = re.compile(r"^specdec_target_live_sequences(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.MULTILINE)


def draft_live_sequences(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = draft_pb2_grpc.DraftServiceStub(channel).GetStats(draft_pb2.GetStatsRequest(), timeout=5)
    return stats.live_sequences


def triton_live_sequences(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:  # noqa: S310 - loopback only
        text = response.read().decode()
    values = _TRITON_LIVE.findall(text)
    if not values:
        raise AssertionError(f"specdec_target_live_sequences missing from {metrics_url}")
    return int(sum(float(v) for v in values))


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll until true; fail with ``what`` after the timeout (releases are asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for: {what}")
        time.sleep(0.1)


def frozen_objects(log_text: str) -> int:
    """How many objects a process froze after its startup (``specdec.gc_freeze``); fails if it did not."""
    found = _FROZEN.findall(log_text)
    if len(found) != 1:
        raise AssertionError(f"expected one gc-freeze line in the log, found {len(found)}")
    return int(found[0])
