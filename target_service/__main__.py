"""``python -m target_service``: run Triton with the specdec target model until Ctrl-C or SIGTERM.

Every flag falls back to an environment variable (``SPECDEC_TARGET_<FLAG>``), then to the defaults in
``target_service.config`` (the ports default to Triton's usual 8001 gRPC, 8000 HTTP and 8002 metrics;
pass 0 for a free port). While it runs, it probes the model itself (`target_service.liveness`) and
restarts a Triton whose model stopped answering, on the same ports.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from specdec.startup import StopSignals, exit_if_startup_fails
from specdec.tls import channel_credentials
from target_service.config import TritonServerConfig, parse_target_config
from target_service.launcher import TritonServer
from target_service.liveness import Liveness, probe

log = logging.getLogger("target_service")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_target_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if config.log_verbose > 0:
        logging.getLogger("target_service.tritonserver").setLevel(logging.DEBUG)
        logging.getLogger().setLevel(logging.DEBUG)
    signals = StopSignals(log)
    stop = signals.stop
    with exit_if_startup_fails(log):
        server = TritonServer(config)
        server.start()  # stops what it started if it fails
    with server:
        log.info(
            "serving model %r: grpc %s, http %s, metrics %s (Ctrl-C to stop)",
            server.model_name, server.grpc_url, server.http_url, server.metrics_url,
        )  # fmt: skip
        with exit_if_startup_fails(log):
            liveness = start_liveness(config, server)
        signals.serving()
        try:
            while not stop.wait(0.5):
                if not server.is_running():
                    log.error("Triton exited on its own\n%s", server.log_tail())
                    return 1
                if liveness is not None and liveness.stuck() and not stop.is_set():
                    try:
                        restart_stuck(server, liveness)
                    except Exception as exc:  # noqa: BLE001 - the service ends with the reason, not a traceback
                        log.error("restarting Triton failed: %s", exc)
                        return 1
        finally:
            if liveness is not None:
                liveness.stop()
    return 0


def start_liveness(config: TritonServerConfig, server: TritonServer) -> Liveness | None:
    """The probes of the model (`target_service.liveness`), unless off (interval 0, or TLS without
    ``liveness_tls_ca``). A first probe must reach the model: probes that cannot (the wrong CA or name, a
    certificate without clientAuth under mutual TLS) would never see it stuck, so that is an error
    (RuntimeError; ValueError for unreadable files), not a service quietly running unwatched. A model that
    is reached and does not answer is the probes' to judge, as later."""
    if config.liveness_interval_s == 0:
        return None
    if config.grpc_tls_cert and not config.liveness_tls_ca:
        log.warning("liveness probes off: gRPC is TLS and --liveness-tls-ca (the CA that signed --grpc-tls-cert) "
                    "is not given")  # fmt: skip
        return None
    credentials = None
    if config.grpc_tls_cert:
        own = (config.grpc_tls_cert, config.grpc_tls_key) if config.grpc_tls_client_ca else ("", "")  # mutual TLS
        credentials = channel_credentials(config.liveness_tls_ca, *own)
    if probe(server.grpc_url, server.model_name, config.liveness_timeout_s, credentials,
             config.liveness_server_name) is None:  # fmt: skip
        raise RuntimeError(
            f"the first liveness probe could not reach the model at {server.grpc_url}"
            + (" over TLS: check that --liveness-tls-ca signed --grpc-tls-cert, that the certificate names "
               "--liveness-server-name (or --host), and, under mutual TLS, that it carries clientAuth and comes from "
               "--grpc-tls-client-ca" if credentials is not None else "")
        )  # fmt: skip
    log.info("liveness probes every %g s%s: a model that leaves one unanswered for %g s is restarted",
             config.liveness_interval_s, " over TLS" if credentials is not None else "", config.liveness_timeout_s)
    return Liveness(server.grpc_url, server.model_name, config.liveness_interval_s, config.liveness_timeout_s,
                    credentials, config.liveness_server_name)  # fmt: skip


def restart_stuck(server: TritonServer, liveness: Liveness) -> None:
    """The model stopped answering: log where its threads are, then restart Triton on the same ports."""
    stubs = server.dump_model_stacks()
    log.error("the model stopped answering its liveness probes: restarting Triton (the stacks of its %d stub(s) "
              "follow in its log)", stubs)
    time.sleep(1.0)  # the stacks reach the log before the stub is stopped
    server.restart()
    liveness.reset()
    log.info("Triton restarted: grpc %s", server.grpc_url)


if __name__ == "__main__":
    sys.exit(main())
