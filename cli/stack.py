"""The whole system on one machine: Triton (target), the draft service and the orchestrator as processes.

`specdec serve`, the end-to-end test fixture and the benchmark all start the stack the same way, from our
own entry points (`python -m target_service`, `python -m draft_service`, `python -m orchestrator`), on
127.0.0.1 and free ports, wait until each one is healthy, and stop all of them however they exit.

A local *fleet* runs several Triton and draft replicas (``target_replicas``, ``draft_replicas``) behind one
orchestrator, which balances generations over them (``orchestrator.pools``). Replica 0 of each kind is
named "triton" and "draft", the others "triton-1", "draft-1", ...; ``route`` lets a test put something
(a fault proxy) between the orchestrator and each replica.

For fault-injection tests, `LocalStack.kill(name)` crashes one service (SIGKILL) and
`LocalStack.restart(name)` starts it again with the same command line (same ports) and waits until it is
healthy, while the others keep running.
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
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path

from draft_service.drafters import needs_model, parse_drafters
from specdec import models
from specdec import target_contract as contract
from specdec.config import check_ports
from specdec.hostport import join_host_port
from specdec.procs import Process, children_named, free_ports, wait_grpc_healthy, wait_triton_ready

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
    draft_replicas: int = field(
        default=1, metadata={"help": "draft service processes (a local fleet when > 1); 0 = target-only"}
    )
    target_replicas: int = field(default=1, metadata={"help": "Triton processes (a local fleet when > 1)"})

    def __post_init__(self) -> None:
        """Refuse what would fail only once some services run (each service checks the rest of its own)."""
        check_ports(self, "port")
        parse_drafters(self.drafters)
        if self.draft_replicas < 0 or self.target_replicas < 1:
            raise ValueError(f"need draft_replicas >= 0 and target_replicas >= 1, got {self.draft_replicas} and "
                             f"{self.target_replicas}")  # fmt: skip
        if self.threads < 0 or self.startup_timeout_s <= 0:
            raise ValueError(f"need threads >= 0 and startup_timeout_s > 0, got {self.threads} and "
                             f"{self.startup_timeout_s}")  # fmt: skip


def replica_name(kind: str, index: int) -> str:
    """"triton", "triton-1", ...: replica 0 keeps the plain name."""
    return kind if index == 0 else f"{kind}-{index}"


class LocalStack:
    """Triton(s) + draft service(s) + orchestrator on 127.0.0.1. Use as a context manager.

    ``env`` adds environment variables for every process (e.g. ``SPECDEC_ORCHESTRATOR_*`` settings that
    `StackConfig` does not carry). ``route(name, address)`` returns the address the orchestrator should use
    for replica ``name`` listening at ``address`` (default: the address itself)."""

    def __init__(
        self,
        config: StackConfig,
        env: Mapping[str, str] | None = None,
        route: Callable[[str, str], str] | None = None,
    ) -> None:
        if config.target_replicas < 1 or config.draft_replicas < 0:
            raise ValueError("a stack needs target_replicas >= 1 and draft_replicas >= 0")
        self.config = config
        self.env = dict(env or {})
        self.route = route or (lambda _name, address: address)
        self.processes: list[Process] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._ready: dict[str, Callable[[Process], None]] = {}  # name -> wait until that process serves
        self.address = ""
        self.draft_addresses: list[str] = []  # where each draft replica listens
        self.triton_urls: list[str] = []  # each Triton's gRPC host:port
        self.triton_metrics_urls: list[str] = []
        self.draft_metrics_urls: list[str] = []
        self.orchestrator_metrics_url = ""

    # The first replica of each kind, for single-replica stacks.
    @property
    def draft_address(self) -> str:
        return self.draft_addresses[0] if self.draft_addresses else ""

    @property
    def triton_url(self) -> str:
        return self.triton_urls[0]

    @property
    def triton_metrics_url(self) -> str:
        return self.triton_metrics_urls[0]

    @property
    def draft_metrics_url(self) -> str:
        return self.draft_metrics_urls[0] if self.draft_metrics_urls else ""

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
        common = ["--cache-dir", cfg.cache_dir, "--threads", str(cfg.threads)]
        t0 = time.monotonic()

        # Every replica's ports in one pick, so no two servers are handed the same one.
        ports = iter(free_ports(3 * cfg.target_replicas + 2 * cfg.draft_replicas, host))
        tritons = []
        for i in range(cfg.target_replicas):
            name = replica_name("triton", i)
            grpc_port, http_port, metrics_port = next(ports), next(ports), next(ports)
            log.info("starting %s (target %s) ...", name, cfg.target_model)
            tritons.append(self._spawn(name, log_dir, env, [
                py, "-m", "target_service", "--host", host, "--grpc-port", str(grpc_port),
                "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                "--model", cfg.target_model, "--dtype", cfg.target_dtype, *common,
            ]))  # fmt: skip
            self.triton_urls.append(join_host_port(host, grpc_port))
            self.triton_metrics_urls.append(f"http://{join_host_port(host, metrics_port)}/metrics")
            http_url = join_host_port(host, http_port)
            self._ready[name] = lambda p, u=http_url: wait_triton_ready(
                u, contract.MODEL_NAME, cfg.startup_timeout_s, p.check_alive, p.tail
            )
        drafts = []
        for i in range(cfg.draft_replicas):
            name = replica_name("draft", i)
            port, metrics_port = next(ports), next(ports)
            log.info("starting %s (drafters %s; model %s, layers %s) ...", name, cfg.drafters, cfg.draft_model,
                     cfg.draft_layers or "all")
            drafts.append(self._spawn(name, log_dir, env, [
                py, "-m", "draft_service", "--host", host, "--port", str(port),
                "--metrics-port", str(metrics_port), "--drafters", cfg.drafters, "--model", cfg.draft_model,
                "--keep-layers", cfg.draft_layers, "--dtype", cfg.draft_dtype, *common,
            ]))  # fmt: skip
            self.draft_addresses.append(join_host_port(host, port))
            self.draft_metrics_urls.append(f"http://{join_host_port(host, metrics_port)}/metrics")
            self._ready[name] = lambda p, a=join_host_port(host, port): wait_grpc_healthy(a, p, cfg.startup_timeout_s)
        for process in [*drafts, *tritons]:
            self._ready[process.name](process)
            log.info("%s ready (%.1f s)", process.name, time.monotonic() - t0)

        log.info("starting the orchestrator ...")
        # Its free ports are picked only now: a port picked before the ~20 s of waiting above can meanwhile
        # become the source port of an outgoing connection (the readiness polls), and the bind then fails.
        orch_metrics, orchestrator_port = free_ports(2, host)
        orchestrator_port = cfg.port or orchestrator_port
        draft_spec = ",".join(self.route(replica_name("draft", i), a) for i, a in enumerate(self.draft_addresses))
        triton_spec = ",".join(self.route(replica_name("triton", i), u) for i, u in enumerate(self.triton_urls))
        orchestrator = self._spawn("orchestrator", log_dir, env, [
            py, "-m", "orchestrator", "--host", host, "--port", str(orchestrator_port),
            "--draft-address", draft_spec, "--triton-url", triton_spec,
            "--tokenizer", cfg.target_model, "--cache-dir", cfg.cache_dir,
            "--default-num-draft-tokens", cfg.num_draft_tokens,
            "--metrics-port", str(orch_metrics),
        ])  # fmt: skip
        self.address = join_host_port(host, orchestrator_port)
        self.orchestrator_metrics_url = f"http://{join_host_port(host, orch_metrics)}/metrics"
        self._ready["orchestrator"] = lambda p: wait_grpc_healthy(self.address, p, cfg.startup_timeout_s)
        self._ready["orchestrator"](orchestrator)
        log.info("orchestrator ready at %s (%.1f s in all)", self.address, time.monotonic() - t0)

    def _spawn(self, name: str, log_dir: Path, env: dict[str, str], argv: list[str]) -> Process:
        process = Process(name, argv, log_dir / f"{name}.log", env)
        self.processes.append(process)
        return process

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def kill(self, name: str, timeout_s: float = 60.0) -> None:
        """Crash one service with SIGKILL ("triton", "draft", "orchestrator", "triton-1", ...); the others
        keep running.

        For "triton" the victim is the tritonserver process itself, as in a real crash: its launcher
        (``python -m target_service``) sees it die, cleans up after it (model stubs, shared memory) and exits.
        """
        process = self.process(name)
        if name.startswith("triton"):
            for pid in children_named(process.pid, "tritonserver"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                process.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the Triton launcher outlived tritonserver by %.0f s; killing it", timeout_s)
        process.kill()
        log.info("%s killed", name)

    def restart(self, name: str, env: Mapping[str, str | None] | None = None) -> None:
        """Stop ``name`` if it still runs (gracefully: SIGTERM), start it again with the same command line
        and ports, and wait until it is healthy (Triton: server and model ready). ``env`` changes its
        environment (a None value removes a variable)."""
        index = next(i for i, p in enumerate(self.processes) if p.name == name)
        old = self.processes[index]
        old.stop()
        started = time.monotonic()
        new_env = {k: v for k, v in {**old.env, **(env or {})}.items() if v is not None}
        new = Process(name, old.argv, old.log_path, new_env)
        self.processes[index] = new
        self._ready[name](new)
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
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
