"""``python -m specdec.probe ADDRESS``: a grpc.health.v1 check for exec probes, over TLS when the port is TLS.

Why it exists: Kubernetes' built-in gRPC probe speaks plaintext only, so once the orchestrator's or the
draft service's port requires (mutual) TLS, the probe must present the pod's own certificate. The images
already hold Python and grpcio, so the probe is a few lines of ours rather than another binary. Exit code
0 when the server reports SERVING, 1 otherwise (with the reason on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.tls import channel_credentials, channel_options


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.probe", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the server")
    parser.add_argument("--service", default="", help="health service name ('' = the server as a whole)")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle that signed the server's certificate ('' = plaintext)")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate, for a server that requires one")
    parser.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    parser.add_argument("--server-name", default="", help="name the server's certificate must carry")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds before the probe fails")
    args = parser.parse_args(argv)
    try:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    options = channel_options(credentials, args.server_name)
    if credentials is None:
        channel = grpc.insecure_channel(args.address, options=options)
    else:
        channel = grpc.secure_channel(args.address, credentials, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"probe: {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"probe: {args.address} reports {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
