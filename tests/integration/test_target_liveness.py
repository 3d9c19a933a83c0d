"""A Triton whose model stopped answering is restarted by its own service (`target_service.liveness`).

``python -m target_service`` (tiny model, 127.0.0.1, free ports) with probes every 0.5 s and a 3 s limit.
The model's stub is frozen (SIGSTOP): Triton still reports itself and the model ready, the probe goes
unanswered, and the service logs the stub's stacks and restarts Triton on the same ports, where the model
answers again; under mutual TLS too, the probes presenting the port's own certificate, and a service
whose probes cannot reach the model over TLS (a certificate Triton refuses from a client) stops at start
and says why. A service told to stop while Triton is still loading the model stops at once, its Triton
with it, instead of first waiting for the model. A stub asked for its stacks (SIGUSR1) writes them into the
service's log at ERROR. And a service killed outright (SIGKILL) leaves no Triton behind: Triton runs in a
session of its own, so only the kernel's parent-death signal stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from specdec import target_contract as contract
from specdec.procs import Process, children_named, ended, free_ports, wait_triton_ready
from specdec.tls import channel_credentials
from target_service.liveness import probe
from tests.conftest import SERVER_NAME, Leaf, Pki
from tests.integration.live import wait_until

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def launch_service(model: Path, log_path: Path, *flags: str) -> tuple[Process, str, str]:
    """``python -m target_service`` on free ports, probing every 0.5 s with a 3 s limit; the process and its
    gRPC and HTTP addresses (HTTP: plaintext whether gRPC is TLS or not)."""
    grpc_port, http_port, metrics_port = free_ports(3, HOST)
    env = {**os.environ, "SPECDEC_TARGET_LIVENESS_INTERVAL_S": "0.5", "SPECDEC_TARGET_LIVENESS_TIMEOUT_S": "3",
           "SPECDEC_TARGET_STOP_GRACE_S": "3"}
    process = Process("triton", [
        sys.executable, "-m", "target_service", "--host", HOST, "--grpc-port", str(grpc_port),
        "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--model", str(model),
        "--threads", "1", *flags,
    ], log_path, env)  # fmt: skip
    return process, f"{HOST}:{grpc_port}", f"{HOST}:{http_port}"


def start_service(model: Path, log_path: Path, *flags: str) -> tuple[Process, str, str]:
    """`launch_service`, once Triton serves the model."""
    process, grpc_url, http_url = launch_service(model, log_path, *flags)
    try:
        wait_triton_ready(http_url, contract.MODEL_NAME, 180, process.check_alive, process.tail)
    except BaseException:
        process.stop()
        raise
    return process, grpc_url, http_url


@pytest.fixture
def service(tiny_model: Path, tmp_path: Path):
    process, grpc_url, http_url = start_service(tiny_model, tmp_path / "target.log")
    try:
        yield process, grpc_url, http_url
    finally:
        process.stop()


def mutual_tls_flags(pki: Pki, own: Leaf) -> list[str]:
    """Triton's gRPC port under mutual TLS with ``own`` as its certificate, and the probes trusting the CA."""
    return ["--grpc-tls-cert", own.cert, "--grpc-tls-key", own.key, "--grpc-tls-client-ca", pki.ca,
            "--liveness-tls-ca", pki.ca, "--liveness-server-name", SERVER_NAME]


def stub_of(process: Process) -> tuple[int, int]:
    (triton,) = children_named(process.pid, "tritonserver")
    (stub,) = children_named(triton, "triton_python_b")
    return triton, stub


def test_a_stuck_model_is_restarted_on_the_same_ports_and_answers_again(service):
    process, grpc_url, http_url = service
    assert probe(grpc_url, contract.MODEL_NAME, 10) is True
    command = [sys.executable, "-m", "target_service.liveness", grpc_url, "--timeout-s", "10"]  # the exec probe's
    answered = subprocess.run(command, capture_output=True, text=True, timeout=120)  # noqa: S603 - ours
    assert answered.returncode == 0, answered.stderr
    triton, stub = stub_of(process)

    os.kill(stub, signal.SIGUSR1)  # where its threads are, into the service's log
    wait_until(lambda: "most recent call first" in process.log_path.read_text(), "the stub's stacks logged", 30)
    stacks = [line for line in process.log_path.read_text().splitlines() if "most recent call first" in line]
    assert all(" ERROR " in line for line in stacks), stacks

    os.kill(stub, signal.SIGSTOP)  # the model stops answering; Triton does not notice
    admin = httpclient.InferenceServerClient(http_url)
    assert admin.is_server_ready() and admin.is_model_ready(contract.MODEL_NAME)
    assert probe(grpc_url, contract.MODEL_NAME, 2) is False

    wait_until(lambda: "restarting Triton" in process.log_path.read_text(), "the stuck model noticed", 60)
    wait_until(lambda: "Triton restarted" in process.log_path.read_text(), "Triton restarted", 240)
    process.check_alive()
    assert probe(grpc_url, contract.MODEL_NAME, 10) is True
    again, _ = stub_of(process)
    assert again != triton
    log_text = process.log_path.read_text()
    assert "stopped answering its liveness probes" in log_text and "Traceback" not in log_text


def test_under_mutual_tls_the_probes_present_the_port_s_own_certificate_and_a_stuck_model_is_restarted(
    tiny_model, tmp_path, pki
):
    process, grpc_url, _ = start_service(tiny_model, tmp_path / "target.log",
                                         *mutual_tls_flags(pki, pki.server_and_client))  # fmt: skip
    try:
        client = channel_credentials(pki.ca, pki.client.cert, pki.client.key)
        assert probe(grpc_url, contract.MODEL_NAME, 10, client, SERVER_NAME) is True
        assert probe(grpc_url, contract.MODEL_NAME, 5) is None  # plaintext is refused: the port is TLS
        wait_until(lambda: "liveness probes every 0.5 s over TLS" in process.log_path.read_text(), "probes on", 30)
        _, stub = stub_of(process)
        os.kill(stub, signal.SIGSTOP)
        wait_until(lambda: "restarting Triton" in process.log_path.read_text(), "the stuck model noticed", 60)
        wait_until(lambda: "Triton restarted" in process.log_path.read_text(), "Triton restarted", 240)
        process.check_alive()
        assert probe(grpc_url, contract.MODEL_NAME, 10, client, SERVER_NAME) is True
        assert "liveness probes off" not in process.log_path.read_text()
    finally:
        process.stop()


def test_probes_that_cannot_reach_the_model_over_tls_stop_the_service_at_start(tiny_model, tmp_path, pki):
    # the port's certificate is for servers only: under mutual TLS, Triton refuses it as the probes' own
    process, _, _ = launch_service(tiny_model, tmp_path / "target.log", *mutual_tls_flags(pki, pki.server))
    try:
        assert process.popen.wait(240) == 1, process.tail()
    finally:
        process.stop()
    log_text = process.log_path.read_text()
    assert "the first liveness probe could not reach the model" in log_text, process.tail()
    assert "carries clientAuth" in log_text and "Traceback" not in log_text


def test_a_signal_while_triton_starts_stops_the_service_and_its_triton_at_once(tiny_model, tmp_path):
    process, _, _ = launch_service(tiny_model, tmp_path / "target.log")
    try:
        wait_until(lambda: children_named(process.pid, "tritonserver"), "Triton started", 60)
        (triton,) = children_named(process.pid, "tritonserver")
        assert "serving model" not in process.log_path.read_text()  # still starting: the model loads
        os.kill(process.pid, signal.SIGTERM)
        assert process.popen.wait(60) == 0, process.tail()
    finally:
        process.stop()
    assert ended(triton)
    log_text = process.log_path.read_text()
    assert "received SIGTERM while starting" in log_text and "Traceback" not in log_text, log_text
    assert "serving model" not in log_text  # it stopped waiting for the model, rather than serving it first


def test_a_service_killed_outright_leaves_no_triton_behind(service):
    process, grpc_url, _ = service
    triton, stub = stub_of(process)
    os.kill(process.pid, signal.SIGKILL)  # only the service: Triton is in a session (and group) of its own
    process.popen.wait(30)
    wait_until(lambda: ended(triton) and ended(stub), "Triton and its stub gone with their service", 60)
    assert probe(grpc_url, contract.MODEL_NAME, 5) is None  # nothing listens on its port any more
