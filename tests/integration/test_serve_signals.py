"""``specdec serve`` stops every service it started, however it is told to stop, and even when it cannot.

Why: its services run in sessions of their own (so Ctrl-C reaches ``specdec serve`` alone, and it stops
them in order), which also means nothing else stops them. A SIGTERM or Ctrl-C while the stack was still
starting used to be noted and ignored until every service was up; the SIGHUP of a closed terminal ended
``specdec serve`` at once and left Triton, the draft service and the orchestrator running, holding their
ports (the next ``make serve`` could not bind 50051); so did a SIGKILL or an OOM kill. Each test starts
``python -m cli.main serve`` on the tiny model, signals it, and checks that its whole process tree ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from specdec.tiny import TINY_DRAFT_LAYERS
from tests.integration.live import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BANNER = "specdec is serving"


def launch(model: Path, log_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our own entry point
        [sys.executable, "-m", "cli.main", "serve", "--port", "0", "--target-model", str(model),
         "--draft-model", str(model), "--draft-layers", TINY_DRAFT_LAYERS, "--threads", "1",
         "--log-dir", str(log_dir), "--startup-timeout-s", "180"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip


def wait_for_banner(serve: subprocess.Popen[str]) -> str:
    """Its output up to the line saying it serves (it fails if ``specdec serve`` ends first)."""
    seen = []
    for line in serve.stdout:
        seen.append(line)
        if BANNER in line:
            return "".join(seen)
    raise AssertionError("specdec serve ended before it served:\n" + "".join(seen))


def tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def assert_all_end(processes: list[psutil.Process], timeout_s: float = 60.0) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture
def serve(tiny_model: Path, tmp_path: Path):
    process = launch(tiny_model, tmp_path / "logs")
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        process.stdout.close()


def test_a_sigterm_while_the_stack_starts_stops_what_had_started_at_once(serve, tmp_path) -> None:
    wait_until(lambda: any(p.name() == "tritonserver" for p in tree(serve.pid)), "Triton starting", 60)
    started = tree(serve.pid)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(60) == 0
    output = serve.stdout.read()
    assert BANNER not in output and "while starting" in output and "Traceback" not in output, output
    assert_all_end(started)


def test_a_closed_terminal_s_sighup_stops_every_service(serve) -> None:
    wait_for_banner(serve)
    services = tree(serve.pid)
    assert {"tritonserver"} <= {p.name() for p in services}
    serve.send_signal(signal.SIGHUP)
    assert serve.wait(60) == 0
    assert "stopping the orchestrator" in serve.stdout.read()
    assert_all_end(services)


def test_a_serve_killed_outright_takes_its_services_with_it(serve) -> None:
    wait_for_banner(serve)
    services = tree(serve.pid)
    serve.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal stops each service
    serve.wait(30)
    assert_all_end(services)
