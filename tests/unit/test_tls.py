"""TLS and mutual TLS on the orchestrator's public port and on the draft hop (orchestrator -> draft service).

Each hop is served with a certificate from a throw-away CA (tests/conftest.py `pki`) and requires client
certificates from that CA. On each: a client with a certificate from the CA works; one without a
certificate, or with one from another CA, is refused; plaintext to the TLS port fails cleanly (a clear
UNAVAILABLE, well before the call's deadline). Triton's hop is tests/integration/test_tls_triton.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from draft_service.config import DraftConfig
from draft_service.server import create_server as create_draft_server
from orchestrator.clients import DraftUnavailable
from orchestrator.config import OrchestratorConfig
from orchestrator.draft_grpc import GrpcDraftClient
from orchestrator.pools import DraftPool
from orchestrator.server import create_server
from specdec import probe
from specdec.sampling import SamplingParams
from specdec.tiny import save_tiny_llama
from specdec.tls import channel_credentials, channel_options, server_credentials
from specdec.v1 import generation_pb2_grpc
from tests.conftest import SERVER_NAME, Pki
from tests.fakes import CONTEXT, FakeDraft, FakeTarget, asyncio_test, big_draft, big_target, req

DEADLINE_S = 10.0  # each call's deadline; a refusal must come well before it


def refused(exc: grpc.aio.AioRpcError, started: float) -> None:
    """A clean refusal: UNAVAILABLE (not a hang until the deadline), with gRPC's reason in the message."""
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
    assert time.monotonic() - started < DEADLINE_S / 2, "the refusal took as long as the deadline"
    assert exc.details(), "no reason given"


# --- the files ------------------------------------------------------------------------------------------------


def test_credentials_are_off_without_files_and_refuse_incomplete_or_wrong_ones(pki: Pki, tmp_path) -> None:
    assert server_credentials("", "") is None and channel_credentials("") is None
    assert channel_options(None, SERVER_NAME) == [] and channel_options(channel_credentials(pki.ca), "") == []
    assert channel_options(channel_credentials(pki.ca), SERVER_NAME) == [("grpc.ssl_target_name_override", SERVER_NAME)]
    with pytest.raises(ValueError, match="both a TLS certificate and its key"):
        server_credentials(pki.server.cert, "")
    with pytest.raises(ValueError, match="needs a server certificate"):
        server_credentials("", "", pki.ca)
    with pytest.raises(ValueError, match="cannot read the server CA bundle '/nonexistent.pem'"):
        channel_credentials("/nonexistent.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="is not PEM"):
        server_credentials(pki.server.cert, str(tmp_path / "junk.pem"))


# --- the orchestrator's public port -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_orchestrator(tokenizer, pki: Pki, **fields) -> AsyncIterator[str]:
    config = OrchestratorConfig(
        port=0, context_length=CONTEXT, tls_cert=pki.server.cert, tls_key=pki.server.key, **fields
    )
    server, port = await create_server(
        config, draft_client=FakeDraft(model=big_draft), target_client=FakeTarget(model=big_target), tokenizer=tokenizer
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def generate(address: str, credentials: grpc.ChannelCredentials | None) -> float:
    """One Generate call; returns when it started (for `refused`)."""
    started = time.monotonic()
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        response = await generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            req(max_new_tokens=3), timeout=DEADLINE_S
        )
    assert len(response.token_ids) == 3
    return started


@asyncio_test
async def test_the_public_port_with_mutual_tls_serves_only_clients_with_a_certificate_from_its_ca(tokenizer, pki):
    async with tls_orchestrator(tokenizer, pki, tls_client_ca=pki.ca) as address:
        await generate(address, channel_credentials(pki.ca, pki.client.cert, pki.client.key))  # works
        for credentials in (
            channel_credentials(pki.ca),  # no client certificate
            channel_credentials(pki.ca, pki.rogue_client.cert, pki.rogue_client.key),  # another CA's
            None,  # plaintext
        ):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(address, credentials)
            refused(info.value, started)


@asyncio_test
async def test_the_exec_probe_checks_health_over_mutual_tls(tokenizer, pki):
    """``python -m specdec.probe``: what Kubernetes runs when the port is TLS (its gRPC probe is plaintext)."""
    async with tls_orchestrator(tokenizer, pki, tls_client_ca=pki.ca) as address:
        good = [address, "--tls-ca", pki.ca, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key]
        assert await asyncio.to_thread(probe.main, good) == 0
        assert await asyncio.to_thread(probe.main, good + ["--service", "specdec.v1.GenerationService"]) == 0
        assert await asyncio.to_thread(probe.main, [address, "--tls-ca", pki.ca]) == 1  # no client certificate
        assert await asyncio.to_thread(probe.main, [address]) == 1  # plaintext


@asyncio_test
async def test_the_public_port_with_tls_only_serves_clients_without_a_certificate(tokenizer, pki):
    async with tls_orchestrator(tokenizer, pki) as address:
        await generate(address, channel_credentials(pki.ca))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # a client that trusts another CA refuses the server
            await generate(address, channel_credentials(pki.rogue_ca))
        refused(info.value, started)


# --- the draft hop: the draft service's port, and the orchestrator's draft pool ---------------------------


@pytest.fixture(scope="module")
def tls_draft(pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    model = save_tiny_llama(tmp_path_factory.mktemp("tls-draft") / "model")
    config = DraftConfig(
        port=0, model=str(model), keep_layers="", threads=1, max_sequences=4,
        tls_cert=pki.named_server.cert, tls_key=pki.named_server.key, tls_client_ca=pki.ca,
    )  # fmt: skip
    server = create_draft_server(config)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(0)


async def propose_once(client: GrpcDraftClient) -> None:
    session = await client.open(1, timeout=DEADLINE_S)
    try:
        proposal = await session.propose(0, [1, 2, 3], 2, SamplingParams(temperature=0.0), 7)
        assert len(proposal.token_ids) == 2
    finally:
        await session.close()


@asyncio_test
async def test_the_draft_hop_with_mutual_tls_serves_only_clients_with_a_certificate_from_its_ca(tls_draft, pki):
    good = channel_credentials(pki.ca, pki.client.cert, pki.client.key)
    # The certificate names the service, not the address: the pool checks it against the configured name.
    pool = DraftPool(tls_draft, credentials=good, server_name=SERVER_NAME)
    await pool.start()
    try:
        await pool.pool.check_all()
        assert [s.healthy for s in pool.snapshot()] == [True]
        session = await pool.open(2, timeout=DEADLINE_S)
        assert len((await session.propose(0, [4, 5], 3, SamplingParams(temperature=0.0), 1)).token_ids) == 3
        await session.close()
    finally:
        await pool.close()

    name = channel_options(good, SERVER_NAME)
    cases = {
        "no client certificate": GrpcDraftClient(tls_draft, credentials=channel_credentials(pki.ca), options=name),
        "another CA's certificate": GrpcDraftClient(
            tls_draft, credentials=channel_credentials(pki.ca, pki.rogue_client.cert, pki.rogue_client.key),
            options=name,
        ),
        "a server name the certificate lacks": GrpcDraftClient(tls_draft, credentials=good),
        "plaintext": GrpcDraftClient(tls_draft),
    }  # fmt: skip
    for why, client in cases.items():
        try:
            started = time.monotonic()
            with pytest.raises(DraftUnavailable) as info:
                await client.check_health(DEADLINE_S)
            assert time.monotonic() - started < DEADLINE_S / 2, why
            assert f"draft at {tls_draft}: health check UNAVAILABLE" in str(info.value), why
            with pytest.raises(DraftUnavailable):  # and a generation's stream fails the same clean way
                await asyncio.wait_for(propose_once(client), DEADLINE_S)
        finally:
            await client.close()
