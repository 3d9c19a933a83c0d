"""Mutual TLS on the orchestrator -> Triton hop: the real Triton (from the wheel) with Triton's own
``--grpc-use-ssl-mutual`` flags, passed by ``target_service`` from its TLS settings (tiny model).

A client with a certificate from the CA opens a sequence, scores and releases it, through the
orchestrator's target pool; one without a certificate, with another CA's, or in plaintext is refused
cleanly (a clear UNAVAILABLE naming the pool, within the connect timeout, not a hang). Triton's
plaintext HTTP port keeps its health endpoints open (probes) and closes every other API. The exec liveness
probe (``python -m target_service.liveness``) reaches the model with a certificate from the CA, and fails
without one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from orchestrator.clients import TargetUnavailable
from orchestrator.pools import TargetPool
from specdec.sampling import SamplingParams
from specdec.tiny import save_tiny_llama
from specdec.tls import channel_credentials
from target_service.config import TargetModelParams, TritonServerConfig
from target_service.launcher import TritonServer
from tests.conftest import SERVER_NAME, Pki
from tests.integration.live import triton_live_sequences, wait_until

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def tls_triton(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    model = save_tiny_llama(tmp_path_factory.mktemp("tls-triton") / "model")
    config = TritonServerConfig(
        grpc_port=0, http_port=0, metrics_port=0, ready_timeout_s=180.0,
        grpc_tls_cert=pki.server.cert, grpc_tls_key=pki.server.key, grpc_tls_client_ca=pki.ca,
        params=TargetModelParams(model=str(model), threads=1, max_sequences=4),
    )  # fmt: skip
    with TritonServer(config) as server:
        yield server


async def score_once(url: str, credentials: grpc.ChannelCredentials | None) -> int:
    """Open a sequence through a target pool, score, release; returns the rows' count."""
    pool = TargetPool(url, credentials=credentials, connect_timeout_s=CONNECT_TIMEOUT_S)
    await pool.start()
    try:
        session = await pool.open(1234, timeout=30.0)
        try:
            rows = await session.score(0, [1, 2, 3, 4], 2, SamplingParams(temperature=0.0))
        finally:
            await session.close()
        return rows.shape[0]
    finally:
        await pool.close()


def test_triton_with_mutual_tls_serves_only_clients_with_a_certificate_from_its_ca(tls_triton, pki):
    url = tls_triton.grpc_url
    assert asyncio.run(score_once(url, channel_credentials(pki.ca, pki.client.cert, pki.client.key))) == 2
    wait_until(lambda: triton_live_sequences(tls_triton.metrics_url) == 0, "the sequence released", 15)

    for why, credentials in {
        "no client certificate": channel_credentials(pki.ca),
        "another CA's certificate": channel_credentials(pki.ca, pki.rogue_client.cert, pki.rogue_client.key),
        "a client that trusts another CA": channel_credentials(pki.rogue_ca, pki.client.cert, pki.client.key),
        "plaintext": None,
    }.items():
        started = time.monotonic()
        with pytest.raises(TargetUnavailable) as info:
            asyncio.run(score_once(url, credentials))
        seconds = time.monotonic() - started
        print(f"\n    {why}: refused in {seconds:.1f} s: {info.value}")
        assert str(info.value).startswith(f"no target replica is available (pool {url}); tried {url}: "), why
        assert seconds < CONNECT_TIMEOUT_S + 5.0, why
    assert triton_live_sequences(tls_triton.metrics_url) == 0


def test_triton_http_port_keeps_health_open_and_every_other_api_closed(tls_triton):
    base = f"http://{tls_triton.http_url}"
    for path in ("/v2/health/ready", f"/v2/models/{tls_triton.model_name}/ready"):
        with urllib.request.urlopen(base + path, timeout=5) as response:  # noqa: S310 - loopback
            assert response.status == 200, path
    for path in ("/v2", f"/v2/models/{tls_triton.model_name}/config", "/v2/repository/index"):
        with pytest.raises(urllib.error.HTTPError) as info:
            request = urllib.request.Request(base + path, method="POST" if "repository" in path else "GET")
            urllib.request.urlopen(request, timeout=5)  # noqa: S310 - loopback
        assert info.value.code in (401, 403), (path, info.value.code)


def test_the_liveness_command_reaches_the_model_with_a_certificate_from_the_ca(tls_triton, pki):
    def probe(*tls: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "target_service.liveness", tls_triton.grpc_url, "--timeout-s", "10", *tls]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)  # noqa: S603 - ours

    answered = probe("--tls-ca", pki.ca, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key,
                     "--server-name", SERVER_NAME)  # fmt: skip
    assert answered.returncode == 0, answered.stderr
    for why, tls in {"no client certificate": ["--tls-ca", pki.ca], "plaintext": []}.items():
        refused = probe(*tls)
        assert refused.returncode == 1 and "Triton could not be asked" in refused.stderr, (why, refused.stderr)
    assert triton_live_sequences(tls_triton.metrics_url) == 0
