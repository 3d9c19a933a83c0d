"""Start the real Triton Inference Server from the ``nvidia-pytriton`` wheel on our model repository.

The wheel ships ``pytriton/tritonserver`` (Triton 2.51: the server binary, the Python backend and one
backend stub per Python version). Running it outside PyTriton takes a few steps, all done here:

* copy the ``tritonserver`` folder once to a writable cache (``$SPECDEC_CACHE_DIR`` or ``~/.cache/specdec``,
  never site-packages) with the stub of the running Python in ``backends/python/``;
* render ``model_repository/specdec_target`` into a temporary folder, with the config's parameters,
  instance group and sequence-batcher sizes taken from ``TritonServerConfig``;
* run ``bin/tritonserver`` with this venv's ``bin`` first on ``PATH`` (the stub's Python must import torch),
  ``LD_LIBRARY_PATH`` = the interpreter's ``LIBDIR`` (else the stub loads the system libpython against our
  standard library) + the wheel's bundled libraries, and ``HF_HUB_OFFLINE=1``;
* wait until server and model are ready (Triton's HTTP ready endpoints), or fail loudly with the tail of
  the Triton log;
* with TLS configured, serve gRPC over TLS (mutual TLS with a client CA) with Triton's own ``--grpc-use-ssl``
  flags; the plaintext HTTP port then keeps only its health API open (``--http-restricted-api`` puts every
  other HTTP API behind a header whose value is a random secret of this process: nobody has it).

In production the same model repository runs in NVIDIA's Triton container instead (``deploy/triton``).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

from specdec import target_contract as contract
from specdec.filelock import file_lock
from specdec.hostport import bare_host, join_host_port
from specdec.openmp import TARGET_SPINCOUNT, set_spin
from specdec.procs import children_named, free_ports, kill_group, popen_tied_to_this_process, wait_triton_ready
from target_service.config import TritonServerConfig
from target_service.liveness import STUB_COMM, dump_stacks

log = logging.getLogger(__name__)
triton_log = logging.getLogger("target_service.tritonserver")

MODEL_TEMPLATE = Path(__file__).parent / "model_repository" / contract.MODEL_NAME
# Lines Triton logs as errors on every CPU-only start; harmless, logged at DEBUG.
_HARMLESS = ("CudaDriverHelper has not been initialized",)
# The model's Python log lines (the stub's logging format, `target_service.triton_model`).
_PYTHON_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
# A line of a traceback or of a thread's stack: indented, its header, a chained exception's, or its last line.
_CONTINUED = re.compile(r"^(\s|Traceback |During handling |The above exception |[A-Za-z_][\w.]*: |<no Python frame>)")
_STACKS = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):")


def line_level(line: str, previous: int = logging.DEBUG) -> int:
    """The level a line of Triton's output is logged at here: Triton's own lines (F/E/W/I + date) at ERROR,
    WARNING or DEBUG; the model's Python log lines (the stub's logging format) at WARNING and above at their
    own level, below at DEBUG; a thread's stack from faulthandler at ERROR; a line of a traceback or a stack
    at the level of the line before it, so a model's failure shows with its traceback in this service's log,
    not only in Triton's log file; any other line at DEBUG."""
    if line[:1] in ("F", "E", "W", "I") and line[1:2].isdigit():
        if any(h in line for h in _HARMLESS):
            return logging.DEBUG
        return {"F": logging.ERROR, "E": logging.ERROR, "W": logging.WARNING}.get(line[:1], logging.DEBUG)
    if _STACKS.match(line):  # faulthandler's, on SIGUSR1 (`TritonServer.dump_model_stacks`): its lines follow
        return logging.ERROR
    if (match := _PYTHON_LINE.match(line)) is not None:
        level = logging.getLevelName(match.group(1))
        return level if level >= logging.WARNING else logging.DEBUG
    return previous if _CONTINUED.match(line) else logging.DEBUG


def triton_idle_us(idle_ttl_s: float) -> int:
    """Triton's own sequence idle timeout: above the model's TTL, so the model's NOT_FOUND comes first."""
    return int((idle_ttl_s + max(30.0, 0.1 * idle_ttl_s)) * 1e6)


def render_config(text: str, config: TritonServerConfig) -> str:
    """Fill config.pbtxt with ``config``'s values; every field must be found exactly once."""
    params = config.params.parameters()
    subs: list[tuple[str, str]] = [
        (r"(max_batch_size:\s*)\d+", rf"\g<1>{config.max_batch_size}"),
        (r"(preferred_batch_size:\s*\[\s*)\d+", rf"\g<1>{config.max_batch_size}"),
        # Triton must never queue a sequence the model could still take: candidates above capacity.
        (r"(max_candidate_sequences:\s*)\d+", rf"\g<1>{2 * config.params.max_sequences}"),
        (r"(max_sequence_idle_microseconds:\s*)\d+", rf"\g<1>{triton_idle_us(config.params.idle_ttl_s)}"),
        (
            r"(instance_group\s*\[\s*\{\s*kind:\s*)KIND_\w+(\s*count:\s*)\d+",
            rf"\g<1>{config.instance_kind}\g<2>{config.instance_count}",
        ),
    ]
    for key, value in params.items():
        quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        subs.append((rf'(key:\s*"{key}"\s*value:\s*\{{\s*string_value:\s*)"[^"]*"', lambda m, q=quoted: m[1] + q))
    for pattern, replacement in subs:
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise ValueError(f"config template: {pattern!r} matched {count} times, expected once")
    return text


def render_model_repository(dest: Path, config: TritonServerConfig) -> Path:
    """Copy the model template into ``dest/<model>`` with a rendered config; returns ``dest``."""
    model_dir = dest / contract.MODEL_NAME
    shutil.copytree(MODEL_TEMPLATE, model_dir, ignore=shutil.ignore_patterns("__pycache__"))
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(render_config(config_path.read_text(), config))
    return dest


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Triton ships in the nvidia-pytriton wheel: pip install 'specdec[triton]'")
    return Path(list(spec.submodule_search_locations)[0])


def install_tritonserver(cache_root: Path) -> Path:
    """Copy the wheel's ``tritonserver`` (with this Python's stub) to the cache once; returns the copy."""
    source = _pytriton_dir() / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"the nvidia-pytriton wheel has no Python backend stub for Python {python}")
    target = cache_root / f"tritonserver-{importlib.metadata.version('nvidia-pytriton')}-py{python}"
    if (target / "bin" / "tritonserver").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_root / f".{target.name}.lock"):
        if (target / "bin" / "tritonserver").is_file():
            return target
        log.info("copying Triton from %s to %s (once)", source, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
        try:
            copy = tmp / "tritonserver"
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__", "python_backend_stubs"))
            shutil.copy2(stub, copy / "backends" / "python" / "triton_python_backend_stub")
            os.replace(copy, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def triton_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its Python stub need to run this venv's Python."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "/usr/bin:/bin")])
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(_pytriton_dir().parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    # The stub must import this very target_service (and specdec), however the package is installed.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    set_spin(env, TARGET_SPINCOUNT)  # the model's OpenMP threads keep a forward's regions back to back (specdec.openmp)
    return env


def triton_bind_addresses(host: str) -> tuple[str, str]:
    """``host`` as Triton's flags take it: (``--grpc-address``, ``--http-address`` and ``--metrics-address``).

    Triton joins an address and a port with a bare colon, so an IPv6 host must reach its gRPC server in
    brackets (``[::1]``) and its HTTP and metrics servers (libevhtp) as ``ipv6:::1``; given ``::1`` as is,
    gRPC cannot parse ``::1:8001`` and the HTTP server binds 255.255.255.255 without a word. (On ``::``
    those two listeners take IPv6 clients only: libevhtp sets IPV6_V6ONLY; gRPC takes both.)"""
    bare = bare_host(host)
    if ":" not in bare:
        return host, host
    return f"[{bare}]", f"ipv6:{bare}"


class TritonServer:
    """One ``tritonserver`` process serving ``specdec_target``; ``with TritonServer(config) as s: ...``."""

    def __init__(self, config: TritonServerConfig) -> None:
        self.config = config
        self.model_name = contract.MODEL_NAME
        asked = (config.grpc_port, config.http_port, config.metrics_port)  # 0 = a free port, none used twice
        picked = iter(port for port in free_ports(6, config.host) if port not in asked)
        self.grpc_port = config.grpc_port or next(picked)
        self.http_port = config.http_port or next(picked)
        self.metrics_port = config.metrics_port or next(picked)
        self.log_path: Path | None = None
        self.ready_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._pump: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._errors: collections.deque[str] = collections.deque(maxlen=10)
        self._shm_prefix = f"specdec_triton_{uuid.uuid4().hex[:12]}_"

    @property
    def grpc_url(self) -> str:
        return join_host_port(self.config.host, self.grpc_port)

    @property
    def http_url(self) -> str:
        return join_host_port(self.config.host, self.http_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{join_host_port(self.config.host, self.metrics_port)}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self, home: Path, repository: Path) -> list[str]:
        c = self.config
        grpc_address, http_address = triton_bind_addresses(c.host)
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={home / 'backends'}",
            f"--grpc-address={grpc_address}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={http_address}",
            f"--http-port={self.http_port}",
            "--allow-metrics=true",
            f"--metrics-address={http_address}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            # Our own prefix for the stubs' shared-memory regions, so stop() can remove what a killed
            # stub leaves in /dev/shm.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--log-verbose={c.log_verbose}",
        ]
        cmd += self._tls_flags()
        if c.instance_kind == "KIND_CPU":  # no CUDA: no GPU metrics, no pinned host memory (and no warnings)
            cmd += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        return cmd

    def _tls_flags(self) -> list[str]:
        c = self.config
        if not c.grpc_tls_cert:
            return []
        flags = [f"--grpc-server-cert={c.grpc_tls_cert}", f"--grpc-server-key={c.grpc_tls_key}"]
        if c.grpc_tls_client_ca:
            flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={c.grpc_tls_client_ca}"]
        else:
            flags += ["--grpc-use-ssl=true"]
        closed = "inference,metadata,shared-memory,model-config,model-repository,statistics,trace,logging"
        return [*flags, f"--http-restricted-api={closed}:specdec-http-key={secrets.token_hex(16)}"]

    def start(self) -> TritonServer:
        """Start Triton and wait until the model is ready. Triton is sent SIGTERM if this process ends
        without stopping it (`specdec.procs.popen_tied_to_this_process`)."""
        if self._proc is not None:
            raise RuntimeError("already started")
        started = time.monotonic()
        home = install_tritonserver(self.config.cache_root)
        self._tmp = Path(tempfile.mkdtemp(prefix="specdec-triton-"))
        try:
            repository = render_model_repository(self._tmp / "models", self.config)
            self.log_path = Path(self.config.log_file) if self.config.log_file else self._tmp / "tritonserver.log"
            cmd = self.command(home, repository)
            log.info("starting Triton: %s (log: %s)", " ".join(cmd), self.log_path)
            self._proc = popen_tied_to_this_process(
                cmd,
                env=triton_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop Triton in order
            )
            self._pump = threading.Thread(
                target=self._pump_log, args=(self._proc, self.log_path), name="tritonserver-log", daemon=True
            )
            self._pump.start()
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - started
        log.info("Triton ready in %.1f s: grpc %s, metrics %s", self.ready_seconds, self.grpc_url, self.metrics_url)
        return self

    def _wait_ready(self, started: float) -> None:
        def alive() -> None:
            code = self._proc.poll() if self._proc else None
            if code is not None:
                raise RuntimeError(f"tritonserver exited with {code} before it was ready\n{self.log_tail()}")

        timeout_s = self.config.ready_timeout_s - (time.monotonic() - started)
        wait_triton_ready(self.http_url, self.model_name, timeout_s, alive, self.log_tail)

    def _pump_log(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        """Copy Triton's output to the log file and to the ``target_service.tritonserver`` logger."""
        assert proc.stdout is not None
        previous = logging.DEBUG
        with open(path, "ab") as sink:
            for raw in proc.stdout:
                sink.write(raw)
                sink.flush()
                line = raw.decode(errors="replace").rstrip()
                self._tail.append(line)
                level = previous = line_level(line, previous)
                if level == logging.ERROR:
                    self._errors.append(line)
                triton_log.log(level, "%s", line)

    def log_tail(self) -> str:
        """Triton's last error lines and the last lines it (and the model's Python) wrote."""
        errors = "\n".join(self._errors) or "(none)"
        return f"--- Triton errors ---\n{errors}\n--- tail of the Triton log ---\n" + "\n".join(self._tail)

    def dump_model_stacks(self) -> int:
        """Have each model stub write its threads' stacks to the Triton log (SIGUSR1: the model registers
        faulthandler for it, `target_service.triton_model`); how many stubs were asked."""
        return dump_stacks(children_named(self._proc.pid, STUB_COMM) if self._proc is not None else [])

    def restart(self) -> TritonServer:
        """Stop Triton and start it again on the same ports."""
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until Triton exits (or ``timeout``); its exit code or None."""
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._proc.wait(timeout)
        return None

    def stop(self) -> None:
        """SIGTERM, SIGKILL after the grace period, remove the temporary folder. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            log.info("stopping Triton (pid %d)", proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.config.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("Triton ignored SIGTERM for %.0f s: killing it", self.config.stop_grace_s)
                proc.kill()
                proc.wait()
        if proc is not None:
            kill_group(proc.pid)  # a stub outlives a killed Triton (it ignores SIGTERM)
            for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        if self._pump is not None:
            self._pump.join(timeout=5)
            self._pump = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start() if self._proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
