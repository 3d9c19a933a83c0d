"""The benchmark's reading of Triton's counters: settled, never caught halfway through an update."""

from __future__ import annotations

import io

import pytest

from bench import client
from bench.client import ServerReader, TritonCounters


def test_a_reading_caught_halfway_through_an_update_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # the model increments one counter at a time after its answers went out: the first reading has the last
    # forward counted but not its sequence; the counters then settle
    readings = iter([TritonCounters(32, 31, 1.0, 0.0), TritonCounters(32, 32, 1.0, 0.0),
                     TritonCounters(32, 32, 1.0, 0.0), TritonCounters(99, 99, 9.0, 0.0)])
    reader = ServerReader("http://127.0.0.1:1/metrics", "127.0.0.1:1")
    monkeypatch.setattr(reader, "_read_triton", lambda: next(readings))
    try:
        assert reader.triton() == TritonCounters(32, 32, 1.0, 0.0)
    finally:
        reader.close()


def test_counters_that_never_settle_are_returned_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    count = iter(range(10**6))
    reader = ServerReader("http://127.0.0.1:1/metrics", "127.0.0.1:1")
    monkeypatch.setattr(reader, "_read_triton", lambda: TritonCounters(float(next(count))))
    try:
        assert reader.triton(timeout_s=0.1).forwards >= 2
    finally:
        reader.close()


def test_scrape_sums_over_labels_or_reads_one_label(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (b"# TYPE specdec_target_lookup_tokens counter\n"
            b'specdec_target_lookup_tokens_total{model="target",instance="0",kind="drafted"} 19\n'
            b'specdec_target_lookup_tokens_total{model="target",instance="1",kind="drafted"} 4\n'
            b'specdec_target_lookup_tokens_total{model="target",instance="0",kind="accepted"} 1\n')
    monkeypatch.setattr(client.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text))
    name = "specdec_target_lookup_tokens_total"
    assert client.scrape("http://127.0.0.1:1/metrics", name, f"{name}{{kind=drafted}}", f"{name}{{kind=accepted}}",
                         f"{name}{{kind=none}}") == (24.0, 23.0, 1.0, 0.0)
