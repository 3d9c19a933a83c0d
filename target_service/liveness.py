"""Whether the model still answers: a probe through it every few seconds, for the service that runs Triton.

Why it exists: Triton answers its own readiness (server and model READY) without asking the model's Python
stub, so a stub that stopped answering (a thread stuck in a forward or in a send, a deadlock) leaves Triton
"ready" while every request sent to it waits for its caller's deadline; the orchestrator's health checks
(the same readiness) cannot tell either. Upstream reports the same of Python-backend stubs (Triton issues
#7230, #8448); our CI saw one of two Tritons stop answering three seconds into a load test.

So the service asks the model itself: a release request for a sequence id of its own (START and END, no
tokens: the model answers it without a forward), on Triton's gRPC port, every ``interval_s``. `Liveness`
runs the probes on a thread of its own; ``stuck()`` is True once one has gone unanswered for
``timeout_s`` (a healthy model answers within a batch's time: ~a forward of ``max_forward_tokens``), or
Triton answered it that the stub is not healthy (a stub frozen or dead, which Triton does notice).
The caller (`target_service.__main__`) then has the stub's threads' stacks logged and restarts Triton:
the streams of the generations it held break, and the orchestrator re-sends their prefixes to a replica
that answers. A Triton that does not answer at all (stopping, restarting) is not "stuck": its process and
the orchestrator's own health checks cover that.

Where Triton runs without our service (NVIDIA's container in ``deploy/k8s``), the same probe runs once as
a command, for an exec liveness probe: ``python3 -m target_service.liveness 127.0.0.1:8001`` (with the
pod's certificate under mutual TLS) exits 0 when the model answered, 1 otherwise; ``--dump-stacks`` first
has the stubs write their stacks to the container's log, so the restart the kubelet then makes leaves a
trace of where the model was stuck.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from specdec import target_contract as contract
from specdec.procs import pids_named
from specdec.tls import channel_credentials, channel_options

log = logging.getLogger(__name__)

STUB_COMM = "triton_python_b"  # the Python backend stub's command name (/proc's 15 characters)


def infer_inputs(tensors: list[tuple[str, np.ndarray]]) -> list[grpcclient.InferInput]:
    """Named arrays (as `specdec.target_contract` builds them) as tritonclient inputs."""
    inputs = []
    for name, array in tensors:
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def probe(url: str, model: str, timeout_s: float, credentials: grpc.ChannelCredentials | None = None,
          server_name: str = "") -> bool | None:
    """One probe: True if the model answered within ``timeout_s``; False if it did not, or Triton answered
    that the model's stub is not healthy; None if Triton could not be asked (not listening, stopping).
    Over TLS with ``credentials`` (`specdec.tls.channel_credentials`), checking the server's certificate
    against ``server_name`` when given."""
    options = list(channel_options(credentials, server_name))
    client = grpcclient.InferenceServerClient(url, creds=credentials, channel_args=options or None)
    answers: queue.Queue[InferenceServerException | None] = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: answers.put(error), stream_timeout=timeout_s + 5.0)
        sequence_id = contract.probe_sequence_id()
        client.async_stream_infer(model, infer_inputs(contract.release_tensors()), sequence_id=sequence_id, sequence_start=True,
                                  sequence_end=True)
        error = answers.get(timeout=timeout_s)
    except queue.Empty:
        return False
    except InferenceServerException as exc:
        log.debug("liveness probe not sent: %s", exc)
        return None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    if error is None:
        return True
    if contract.TRITON_STUB_UNHEALTHY in error.message():
        log.error("liveness probe: %s", error.message())
        return False  # Triton knows the stub is gone, and answers every request so
    if contract.classify_error(error.status(), error.message()) is contract.ErrorKind.UNAVAILABLE:
        return None  # Triton is going away (or was never there): not for us to judge
    log.warning("liveness probe answered with an error: %s", error)
    return True  # it answered


class Liveness:
    """Probes ``model`` at ``url`` every ``interval_s`` on its own thread until `stop` (over TLS with
    ``credentials`` and ``server_name``, as `probe`)."""

    def __init__(self, url: str, model: str, interval_s: float, timeout_s: float,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str = "") -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"interval_s and timeout_s must be > 0, got {interval_s} and {timeout_s}")
        self.url, self.model, self.interval_s, self.timeout_s = url, model, interval_s, timeout_s
        self._credentials, self._server_name = credentials, server_name
        self._stuck = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="liveness", daemon=True)
        self._thread.start()

    def stuck(self) -> bool:
        """True once a probe went unanswered for ``timeout_s``, or Triton answered that the stub is not
        healthy (until `reset`)."""
        return self._stuck.is_set()

    def reset(self) -> None:
        """Triton was restarted: judge it afresh."""
        self._stuck.clear()

    def stop(self) -> None:
        """No more probes. Does not wait for one under way (it ends within ``timeout_s``; the thread is a
        daemon): a service stopping must not be held up by a model that stopped answering."""
        self._stopping.set()
        self._thread.join(0.5)

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            if self._stuck.is_set():
                continue  # the caller has yet to act on it
            started = time.monotonic()
            answered = probe(self.url, self.model, self.timeout_s, self._credentials, self._server_name)
            if answered is False and not self._stopping.is_set():
                if time.monotonic() - started >= self.timeout_s:  # else probe() logged Triton's answer
                    log.error("no answer to a liveness probe within %.0f s", self.timeout_s)
                self._stuck.set()


def dump_stacks(stubs: list[int] | None = None) -> int:
    """Have the model stubs ``stubs`` (pids; None = every one this process can see) write their threads'
    stacks to Triton's log (SIGUSR1: the model registers faulthandler for it, `target_service.triton_model`);
    how many were asked."""
    stubs = pids_named(STUB_COMM) if stubs is None else stubs
    for pid in stubs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR1)
    return len(stubs)


def main(argv: Sequence[str] | None = None) -> int:
    """One probe as a command (an exec liveness probe): exit 0 if the model answered, 1 if not."""
    parser = argparse.ArgumentParser(
        prog="python -m target_service.liveness",
        description="Ask the model behind a Triton gRPC port to answer a release request of its own (no forward); "
                    "exit 0 if it answered, 1 if it did not within --timeout-s, Triton reports its stub unhealthy, "
                    "or Triton cannot be reached.")  # fmt: skip
    parser.add_argument("address", help="host:port of Triton's gRPC port")
    parser.add_argument("--model", default=contract.MODEL_NAME, help="the model to probe")
    parser.add_argument("--timeout-s", type=float, default=20.0, help="seconds the model has to answer")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle that signed Triton's certificate ('' = plaintext)")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate, for a Triton that requires one")
    parser.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    parser.add_argument("--server-name", default="", help="name Triton's certificate must carry")
    parser.add_argument("--dump-stacks", action="store_true",
                        help="when the model did not answer, first have every model stub in sight write its "
                             "threads' stacks to Triton's log (SIGUSR1)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    logging.basicConfig(level=logging.WARNING, format="liveness: %(message)s", stream=sys.stderr)
    try:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:
        print(f"liveness: {exc}", file=sys.stderr)
        return 1
    answered = probe(args.address, args.model, args.timeout_s, credentials, args.server_name)
    if answered:
        return 0
    if answered is None:
        print(f"liveness: {args.address}: Triton could not be asked (not listening, or stopping)", file=sys.stderr)
        return 1
    print(f"liveness: {args.address}: model {args.model} did not answer a release within {args.timeout_s:g} s, "
          "or its stub is not healthy", file=sys.stderr)  # fmt: skip
    if args.dump_stacks:
        print(f"liveness: asked {dump_stacks()} model stub(s) for their stacks (Triton's log)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
