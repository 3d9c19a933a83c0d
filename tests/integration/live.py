"""How tests see inside the running services: live sequences (the draft service's GetStats RPC and Triton's
Prometheus metric), the orchestrator's per-replica counts, what a process logged about its startup, and
the tiny-model stack the load, fleet and fault tests run."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import StackConfig
from specdec.tiny import TINY_DRAFT_LAYERS
from specdec.v1 import draft_pb2, draft_pb2_grpc
from tests.integration.loadgen import metric, scrape

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


def tiny_stack_config(model: Path, log_dir: Path, **overrides: Any) -> StackConfig:
    """A stack (or fleet) of the tiny model: one torch thread per process, quick to start."""
    values: dict[str, Any] = dict(
        port=0, target_model=str(model), draft_model=str(model), draft_layers=TINY_DRAFT_LAYERS, threads=1,
        log_dir=str(log_dir), startup_timeout_s=180,
    )  # fmt: skip
    values.update(overrides)
    return StackConfig(**values)


def replica_counts(metrics_url: str, series: str, pool: str) -> dict[str, float]:
    """``specdec_orchestrator_replica_<series>`` per replica address of ``pool`` ("draft" or "target")."""
    name = f"specdec_orchestrator_replica_{series}"
    text = scrape(metrics_url)
    return {
        sample.labels["replica"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("pool") == pool
    }


def orchestrator_live_generations(metrics_url: str) -> float:
    return metric(scrape(metrics_url), "specdec_orchestrator_live_generations")
