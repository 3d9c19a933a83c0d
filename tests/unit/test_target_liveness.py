"""`target_service.liveness` without Triton: which probe outcomes make a model "stuck", and the probe against
a server that takes the request and never answers, or answers (the real Triton with a frozen model stub is
tests/integration/test_target_liveness.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from target_service import liveness
from target_service.config import TritonServerConfig
from tests.integration.live import wait_until


def scripted(
    monkeypatch: pytest.MonkeyPatch, outcomes: list[bool | None], asked: list | None = None
) -> threading.Event:
    """Probes answer ``outcomes`` in turn, then True (each probe's arguments appended to ``asked``); the
    event is set once all were used."""
    used = threading.Event()

    def probe(*args: object) -> bool | None:
        if asked is not None:
            asked.append(args)
        if not outcomes:
            used.set()
            return True
        return outcomes.pop(0)

    monkeypatch.setattr(liveness, "probe", probe)
    return used


def test_an_unanswered_probe_makes_it_stuck_until_reset(monkeypatch):
    used = scripted(monkeypatch, [True, False])
    watch = liveness.Liveness("127.0.0.1:1", "m", interval_s=0.01, timeout_s=1.0)
    try:
        wait_until(watch.stuck, "stuck after the unanswered probe", 10)
        assert not used.is_set()  # no probe while stuck: the caller has yet to restart Triton
        watch.reset()
        assert used.wait(10) and not watch.stuck()
    finally:
        watch.stop()


def test_a_triton_that_cannot_be_asked_is_not_stuck(monkeypatch):
    used = scripted(monkeypatch, [None, None, True, None])
    watch = liveness.Liveness("127.0.0.1:1", "m", interval_s=0.01, timeout_s=1.0)
    try:
        assert used.wait(10) and not watch.stuck()
    finally:
        watch.stop()


def test_the_probes_go_over_tls_with_the_credentials_and_name_given(monkeypatch):
    asked: list = []
    used = scripted(monkeypatch, [True], asked)
    credentials = grpc.ssl_channel_credentials()
    watch = liveness.Liveness("127.0.0.1:1", "m", interval_s=0.01, timeout_s=1.0, credentials=credentials,
                              server_name="triton.example")  # fmt: skip
    try:
        assert used.wait(10)
    finally:
        watch.stop()
    assert asked[0] == ("127.0.0.1:1", "m", 1.0, credentials, "triton.example")


def test_liveness_settings_are_checked(pki):
    with pytest.raises(ValueError, match="liveness"):
        TritonServerConfig(liveness_timeout_s=0)
    with pytest.raises(ValueError, match="liveness"):
        TritonServerConfig(liveness_interval_s=-1)
    with pytest.raises(ValueError, match="liveness_tls_ca is for a TLS gRPC port"):
        TritonServerConfig(liveness_tls_ca=pki.ca)
    with pytest.raises(ValueError, match="liveness_server_name is checked over TLS only"):
        TritonServerConfig(grpc_tls_cert=pki.server.cert, grpc_tls_key=pki.server.key, liveness_server_name="x")
    with pytest.raises(ValueError, match="liveness_tls_ca: no such file"):
        TritonServerConfig(grpc_tls_cert=pki.server.cert, grpc_tls_key=pki.server.key, liveness_tls_ca=pki.ca + ".gone")
    with pytest.raises(ValueError, match="interval_s"):
        liveness.Liveness("127.0.0.1:1", "m", interval_s=0, timeout_s=1.0)


class Silent(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A Triton whose model takes requests and answers none (``answer``: or answers each at once)."""

    def __init__(self, answer: bool) -> None:
        self.answer, self.requests = answer, []

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 - the generated name
        for request in request_iterator:
            self.requests.append(request)
            if self.answer:
                yield service_pb2.ModelStreamInferResponse(infer_response=service_pb2.ModelInferResponse())
        while context.is_active():  # keeps the stream open, as a stuck model does
            time.sleep(0.05)


@contextlib.contextmanager
def serving(servicer: Silent) -> Iterator[str]:
    """``servicer`` as a Triton gRPC server on 127.0.0.1; its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.fixture(params=[False, True], ids=["silent", "answering"])
def fake_triton(request) -> Iterator[tuple[str, Silent]]:
    servicer = Silent(answer=request.param)
    with serving(servicer) as url:
        yield url, servicer


def test_the_probe_is_a_release_of_its_own_and_a_silent_model_fails_it(fake_triton):
    url, servicer = fake_triton
    assert liveness.probe(url, "specdec_target", timeout_s=1.0) is servicer.answer
    (request,) = servicer.requests
    assert request.model_name == "specdec_target" and request.parameters["sequence_id"].int64_param > 0
    assert request.parameters["sequence_start"].bool_param and request.parameters["sequence_end"].bool_param
    assert [(i.name, list(i.shape)) for i in request.inputs] == [
        ("INPUT_IDS", [1, 0]), ("KEEP_LENGTH", [1, 1]), ("NUM_LOGITS", [1, 1])]


def test_a_triton_not_listening_cannot_be_asked():
    assert liveness.probe("127.0.0.1:1", "specdec_target", timeout_s=5.0) is None


def test_the_command_exits_0_only_when_the_model_answers(fake_triton, capsys):
    url, servicer = fake_triton
    assert liveness.main([url, "--timeout-s", "1"]) == (0 if servicer.answer else 1)
    assert len(servicer.requests) == 1
    assert ("did not answer a release within 1 s" in capsys.readouterr().err) is not servicer.answer


def test_the_command_fails_when_triton_cannot_be_asked(capsys):
    assert liveness.main(["127.0.0.1:1", "--timeout-s", "5"]) == 1
    assert "127.0.0.1:1: Triton could not be asked" in capsys.readouterr().err


@pytest.mark.parametrize("answer", [False, True], ids=["silent", "answering"])
def test_the_command_has_the_stubs_dump_their_stacks_only_when_the_model_did_not_answer(monkeypatch, capsys, answer):
    stub = subprocess.Popen(  # stands in for a model stub: faulthandler on SIGUSR1, as the model registers it
        [sys.executable, "-c", "import faulthandler, signal, sys, time\n"
         "faulthandler.register(signal.SIGUSR1)\nprint('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert stub.stdout is not None and stub.stdout.readline() == "ready\n"
        monkeypatch.setattr(liveness, "pids_named", lambda name: [stub.pid] if name == liveness.STUB_COMM else [])
        with serving(Silent(answer=answer)) as url:
            assert liveness.main([url, "--timeout-s", "0.5", "--dump-stacks"]) == (0 if answer else 1)
        assert ("asked 1 model stub(s) for their stacks" in capsys.readouterr().err) is not answer
    finally:
        stub.terminate()
        _, err = stub.communicate(timeout=30)
    assert ("most recent call first" in err) is not answer, err


def test_bad_command_settings_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        liveness.main(["127.0.0.1:1", "--timeout-s", "0"])
    assert info.value.code == 2 and "--timeout-s must be > 0" in capsys.readouterr().err
    assert liveness.main(["127.0.0.1:1", "--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(tmp_path / "k")]) == 1
    assert "liveness: " in capsys.readouterr().err
