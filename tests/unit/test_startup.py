"""A service that cannot start says why in one line and exits 1 (`specdec.startup`); one with a bad
setting (a port beyond 65535) refuses it as a usage error before it starts anything; a taken port is one
of the reasons it cannot start: every specdec server binds its port exclusively
(`specdec.grpc_server.EXCLUSIVE_PORT`). Real processes (``python -m draft_service`` / ``orchestrator`` /
...) on 127.0.0.1; no model is loaded. Triton's own case is in tests/integration/test_triton_target.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from specdec.procs import free_ports
from specdec.startup import StopSignals, exit_if_startup_fails
from specdec.tls import add_port

REPO = Path(__file__).resolve().parents[2]


def run_service(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120,  # noqa: S603
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)  # fmt: skip


def assert_cannot_start(done: subprocess.CompletedProcess[str], why: str) -> None:
    assert done.returncode == 1, done.stderr
    assert f"ERROR {done.args[2]}: cannot start: {why}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_start_up_error_is_one_line_and_exit_1_and_a_bug_keeps_its_traceback(caplog) -> None:
    log = logging.getLogger("svc")
    with caplog.at_level(logging.DEBUG, "svc"), pytest.raises(SystemExit) as info:
        with exit_if_startup_fails(log):
            raise FileNotFoundError("model folder /m has no config.json")
    assert info.value.code == 1
    assert [(r.levelname, r.getMessage()) for r in caplog.records][-1] == (
        "ERROR", "cannot start: model folder /m has no config.json")
    assert caplog.records[0].exc_info is not None  # the traceback, at DEBUG
    with pytest.raises(TypeError):
        with exit_if_startup_fails(log):
            raise TypeError("a bug of ours")


@pytest.fixture
def taken_port() -> int:
    """A port held by a grpc server with grpc's default options (SO_REUSEPORT on), as an old process would."""
    holder = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    yield port
    holder.stop(0).wait()


def test_a_signal_while_starting_ends_the_start_and_once_serving_only_sets_the_flag() -> None:
    signals = StopSignals(logging.getLogger("svc"), ())  # no handler installed: handle() is called directly
    with pytest.raises(SystemExit) as info:
        signals.handle(signal.SIGTERM)
    assert info.value.code == 0 and signals.stop.is_set()
    signals.handle(signal.SIGINT)  # a second one, during the clean-up the first one started: no second exit

    serving = StopSignals(logging.getLogger("svc"), ())
    serving.serving()
    serving.handle(signal.SIGTERM)
    assert serving.stop.is_set()


# Each holds its service in the middle of its start (the model load, asking the draft replicas what they
# offer), says so on stdout, and starts the service as ``python -m`` would.
_BLOCK_DRAFT_MODEL_LOAD = """
import sys, time
from draft_service.__main__ import main
import draft_service.build

def load_forever(config):
    print("starting", flush=True)
    time.sleep(120)

draft_service.build.load_draft_model = load_forever
main(sys.argv[1:])
"""
_BLOCK_ORCHESTRATOR_START = """
import asyncio, sys
from orchestrator.__main__ import main
import orchestrator.catalog

async def refresh_forever(self):
    print("starting", flush=True)
    await asyncio.sleep(120)

orchestrator.catalog.DrafterCatalog.refresh = refresh_forever
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("script", "argv", "sig"),
    [
        (_BLOCK_DRAFT_MODEL_LOAD, ["--port", "0", "--drafters", "model", "--model", "/nowhere"], signal.SIGTERM),
        (_BLOCK_DRAFT_MODEL_LOAD, ["--port", "0", "--drafters", "model", "--model", "/nowhere"], signal.SIGINT),
        (_BLOCK_ORCHESTRATOR_START, ["--port", "0", "--metrics-port", "{metrics}"], signal.SIGTERM),
        (_BLOCK_ORCHESTRATOR_START, ["--port", "0", "--metrics-port", "{metrics}"], signal.SIGINT),
    ],
    ids=["draft-sigterm", "draft-sigint", "orchestrator-sigterm", "orchestrator-sigint"],
)
def test_a_service_told_to_stop_while_it_starts_stops_then_and_exits_0(script, argv, sig) -> None:
    """The draft service used to note the signal, load its model, serve, then drain; the orchestrator died
    of a SIGTERM and printed a KeyboardInterrupt traceback on Ctrl-C. Here the start would block for 120 s."""
    (metrics,) = free_ports(1, "127.0.0.1")
    argv = [arg.format(metrics=metrics) for arg in argv]
    service = subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE,  # noqa: S603
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    try:
        assert service.stdout.readline() == "starting\n", service.stderr.read()
        service.send_signal(sig)
        stdout, stderr = service.communicate(timeout=60)
    finally:
        service.kill()
        service.wait()
    assert service.returncode == 0, stderr
    assert f"received {sig.name} while starting: stopping what has started" in stderr, stderr
    assert "Traceback" not in stderr and "ready on" not in stderr and "serving specdec" not in stderr, stderr


def test_add_port_names_the_address_it_could_not_bind(taken_port) -> None:
    exclusive = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{taken_port}"):
        add_port(exclusive, "127.0.0.1", taken_port, None)


class _Recorder:
    """Stands in for a grpc server: remembers the address it was asked to bind."""

    def add_insecure_port(self, address: str) -> int:
        self.address = address
        return 1234


@pytest.mark.parametrize(("host", "address"), [("::1", "[::1]:0"), ("[::1]", "[::1]:0"), ("0.0.0.0", "0.0.0.0:0")])
def test_an_ipv6_host_is_bound_in_brackets(host, address) -> None:
    server = _Recorder()
    assert add_port(server, host, 0, None) == 1234 and server.address == address


def test_an_orchestrator_on_a_taken_port_exits_instead_of_sharing_it(taken_port) -> None:
    (metrics,) = free_ports(1, "127.0.0.1")
    done = run_service("orchestrator", "--port", str(taken_port), "--metrics-port", str(metrics))
    assert_cannot_start(done, f"cannot bind 127.0.0.1:{taken_port}")
    assert "serving" not in done.stderr


def test_a_draft_service_without_its_model_says_so(tmp_path) -> None:
    done = run_service("draft_service", "--port", "0", "--drafters", "model", "--model", str(tmp_path / "no-model"))
    assert_cannot_start(done, f"model folder {tmp_path / 'no-model'} has no config.json")


def test_a_target_service_on_a_host_that_does_not_resolve_says_so() -> None:
    done = run_service("target_service", "--host", "no-such-host.invalid", "--grpc-port", "0")
    assert_cannot_start(done, "cannot resolve host 'no-such-host.invalid'")


def test_an_orchestrator_with_an_unreadable_tls_file_says_so(tmp_path) -> None:
    done = run_service("orchestrator", "--port", "0", "--tls-cert", str(tmp_path / "c.pem"),
                       "--tls-key", str(tmp_path / "k.pem"))  # fmt: skip
    assert_cannot_start(done, f"cannot read the server TLS key {str(tmp_path / 'k.pem')!r}")


@pytest.mark.parametrize(
    ("module", "flag"),
    [
        (["orchestrator"], "--port"), (["orchestrator"], "--metrics-port"), (["draft_service"], "--port"),
        (["target_service"], "--grpc-port"), (["cli.main", "serve"], "--port"),
    ],
)
def test_every_service_refuses_a_port_beyond_65535_before_it_starts(module, flag) -> None:
    done = run_service(*module, flag, "99999")
    assert done.returncode == 2, done.stderr
    assert f"{flag.lstrip('-').replace('-', '_')} must be in [0, 65535], got 99999" in done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr + done.stdout
