"""The whole system on one machine: Triton (target), the draft service and the orchestrator as processes.

`specdec serve`, the end-to-end test fixture and the benchmark all start the stack the same way, from our
own entry points (`python -m target_service`, `python -m draft_service`, `python -m orchestrator`), on
127.0.0.1 and free ports, wait until each one is healthy, and stop all of them however they exit.

For fault-injection tests, `LocalStack.kill(name)` crashes one service (SIGKILL) and
`LocalStack.restart(name)` starts it again with the same command line (same ports) and waits until it is
healthy, while the other two keep running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path

from draft_service.drafters import needs_model, parse_drafters
from specdec import models
from specdec import target_contract as contract
from specdec.openmp import short_spin
from specdec.procs import Process, children_named, free_port, wait_grpc_healthy, wait_triton_ready

log = logging.getLogger(__name__)

# What `specdec serve` offers: model-free drafters first (the best default on a CPU, where a model draft
# costs more than it saves: bench/README.md), the SmolLM2 self-draft for requests that ask for it.
DEFAULT_DRAFTERS = "suffix,ngram,model,hybrid"


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """What the local stack runs; every field has a flag in `specdec serve`."""

    host: str = field(default="127.0.0.1", metadata={"help": "address every service binds"})
    port: int = field(default=50051, metadata={"help": "the orchestrator's (public) port; 0 = a free port"})
    target_model: str = field(default=models.SMOLLM2, metadata={"help": "the target: 'smollm2' or a local HF folder"})
    target_dtype: str = field(default="float32", metadata={"help": "the target's weights dtype"})
    drafters: str = field(
        default=DEFAULT_DRAFTERS,
        metadata={"help": "drafters the draft service offers, its default first (model, ngram, suffix, hybrid); "
                  "the draft model is loaded only if model or hybrid is among them"},
    )
    draft_model: str = field(default=models.SMOLLM2, metadata={"help": "the draft model (for model and hybrid)"})
    draft_layers: str = field(default=models.SMOLLM2_SELF_DRAFT_LAYERS, metadata={"help": "layers the draft model keeps"})
    draft_dtype: str = field(default="float32", metadata={"help": "the draft model's weights dtype"})
    num_draft_tokens: str = field(
        default="auto", metadata={"help": "K when a request leaves it unset: 'auto' (chosen per round) or a number"}
    )
    threads: int = field(default=0, metadata={"help": "torch threads per model process; 0 = torch's default"})
    cache_dir: str = field(default="", metadata={"help": "converted models; '' = $SPECDEC_CACHE_DIR or ~/.cache/specdec"})
    startup_timeout_s: float = field(default=300.0, metadata={"help": "how long each service may take to start"})
    log_dir: str = field(default="", metadata={"help": "where each process's log goes; '' = a temporary folder"})


class LocalStack:
    """Triton + draft service + orchestrator on 127.0.0.1. Use as a context manager.

    ``env`` adds environment variables for the three processes (e.g. ``SPECDEC_ORCHESTRATOR_*`` settings
    that `StackConfig` does not carry)."""

    def __init__(self, config: StackConfig, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = dict(env or {})
        self.processes: list[Process] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.address = ""
        self.draft_address = ""
        self.triton_url = ""
        self.triton_metrics_url = ""
        self.draft_metrics_url = ""
        self.orchestrator_metrics_url = ""

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cfg = self.config
        if cfg.log_dir:
            log_dir = Path(cfg.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="specdec-stack-")
            log_dir = Path(self._tmp.name)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        for spec in {cfg.target_model} | ({cfg.draft_model} if needs_model(parse_drafters(cfg.drafters)) else set()):
            log.info("preparing model %s (the first run converts the packaged SmolLM2, ~20 s)", spec)
            models.resolve_model_dir(spec, cache_dir)
        env = {**child_env(), **self.env}
        py = sys.executable
        host = cfg.host
        ports = {name: free_port(host) for name in ("grpc", "http", "metrics", "draft", "draft_metrics")}
        common = ["--cache-dir", cfg.cache_dir, "--threads", str(cfg.threads)]

        log.info("starting Triton (target %s) ...", cfg.target_model)
        t0 = time.monotonic()
        triton = self._spawn("triton", log_dir, env, [
            py, "-m", "target_service", "--host", host, "--grpc-port", str(ports["grpc"]),
            "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"]),
            "--model", cfg.target_model, "--dtype", cfg.target_dtype, *common,
        ])
        log.info("starting the draft service (drafters %s; model %s, layers %s) ...", cfg.drafters, cfg.draft_model,
                 cfg.draft_layers or "all")
        draft = self._spawn("draft", log_dir, env, [
            py, "-m", "draft_service", "--host", host, "--port", str(ports["draft"]),
            "--metrics-port", str(ports["draft_metrics"]), "--drafters", cfg.drafters, "--model", cfg.draft_model,
            "--keep-layers", cfg.draft_layers, "--dtype", cfg.draft_dtype, *common,
        ])
        self.draft_address = f"{host}:{ports['draft']}"
        self.triton_url = f"{host}:{ports['grpc']}"
        self.triton_metrics_url = f"http://{host}:{ports['metrics']}/metrics"
        self.draft_metrics_url = f"http://{host}:{ports['draft_metrics']}/metrics"
        wait_grpc_healthy(self.draft_address, draft, cfg.startup_timeout_s)
        log.info("draft service ready at %s (%.1f s)", self.draft_address, time.monotonic() - t0)
        wait_triton_ready(self.triton_url, contract.MODEL_NAME, cfg.startup_timeout_s, triton.check_alive, triton.tail)
        log.info("Triton ready at %s (%.1f s)", self.triton_url, time.monotonic() - t0)

        log.info("starting the orchestrator ...")
        # Its free ports are picked only now: a port picked before the ~20 s of waiting above can meanwhile
        # become the source port of an outgoing connection (the readiness polls), and the bind then fails.
        ports["orch_metrics"] = free_port(host)
        orchestrator_port = cfg.port or free_port(host)
        orchestrator = self._spawn("orchestrator", log_dir, env, [
            py, "-m", "orchestrator", "--host", host, "--port", str(orchestrator_port),
            "--draft-address", self.draft_address, "--triton-url", self.triton_url,
            "--tokenizer", cfg.target_model, "--cache-dir", cfg.cache_dir,
            "--default-num-draft-tokens", cfg.num_draft_tokens,
            "--metrics-port", str(ports["orch_metrics"]),
        ])
        self.address = f"{host}:{orchestrator_port}"
        self.orchestrator_metrics_url = f"http://{host}:{ports['orch_metrics']}/metrics"
        wait_grpc_healthy(self.address, orchestrator, cfg.startup_timeout_s)
        log.info("orchestrator ready at %s (%.1f s in all)", self.address, time.monotonic() - t0)

    def _spawn(self, name: str, log_dir: Path, env: dict[str, str], argv: list[str]) -> Process:
        process = Process(name, argv, log_dir / f"{name}.log", env)
        self.processes.append(process)
        return process

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def kill(self, name: str, timeout_s: float = 60.0) -> None:
        """Crash one service with SIGKILL ("triton", "draft" or "orchestrator"); the others keep running.

        For "triton" the victim is the tritonserver process itself, as in a real crash: its launcher
        (``python -m target_service``) sees it die, cleans up after it (model stubs, shared memory) and exits.
        """
        process = self.process(name)
        if name == "triton":
            for pid in children_named(process.pid, "tritonserver"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                process.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the Triton launcher outlived tritonserver by %.0f s; killing it", timeout_s)
        process.kill()
        log.info("%s killed", name)

    def restart(self, name: str) -> None:
        """Stop ``name`` if it still runs (gracefully: SIGTERM), start it again with the same command line
        and ports, and wait until it is healthy (Triton: server and model ready)."""
        index = next(i for i, p in enumerate(self.processes) if p.name == name)
        old = self.processes[index]
        old.stop()
        started = time.monotonic()
        new = Process(name, old.argv, old.log_path, old.env)
        self.processes[index] = new
        timeout_s = self.config.startup_timeout_s
        if name == "triton":
            wait_triton_ready(self.triton_url, contract.MODEL_NAME, timeout_s, new.check_alive, new.tail)
        else:
            wait_grpc_healthy(self.address if name == "orchestrator" else self.draft_address, new, timeout_s)
        log.info("%s restarted in %.1f s", name, time.monotonic() - started)

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def stop(self) -> None:
        for process in reversed(self.processes):  # orchestrator first, Triton last
            process.stop()
        self.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    short_spin(env)  # OpenMP threads that let go of the cores between rounds (specdec.openmp)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
