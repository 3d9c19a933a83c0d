"""TLS and mutual TLS for every gRPC hop, from PEM files named in each service's config.

Why it exists: the orchestrator's public port, the orchestrator's channels to the draft service and to
Triton, and the draft service's port each take the same three files (a certificate, its key, a CA bundle)
and must refuse the same mistakes the same way; grpc builds the credentials (``grpc.ssl_server_credentials``,
``grpc.ssl_channel_credentials``), this module only reads and checks the files. TLS is off unless files
are given (an empty path means "none"), so a plaintext deployment needs no change.

Server side: a certificate and key turn TLS on; a client CA also requires every client to present a
certificate from that CA (mutual TLS). Client side: a CA turns TLS on and verifies the server; a
certificate and key are presented to servers that require one; ``server_name`` overrides the name
checked against the server's certificate (a pool connects to the addresses a DNS name resolved to, and
the certificate names the service, not each pod's address).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from specdec.hostport import join_host_port

_NAME_OVERRIDE = "grpc.ssl_target_name_override"


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {path!r} is not PEM (no '-----BEGIN' line)")
    return data


def _pair(cert: str, key: str, side: str) -> tuple[bytes, bytes] | None:
    if bool(cert) != bool(key):
        raise ValueError(f"{side}: give both a TLS certificate and its key, or neither")
    if not cert:
        return None
    return _read(key, f"{side} TLS key"), _read(cert, f"{side} TLS certificate")


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """Credentials for a server port: None (plaintext) when ``cert`` is empty; with ``client_ca``, clients
    must present a certificate signed by it (mutual TLS)."""
    pair = _pair(cert, key, "server")
    if pair is None:
        if client_ca:
            raise ValueError("server: a client CA needs a server certificate and key (mutual TLS is TLS first)")
        return None
    root = _read(client_ca, "client CA bundle") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """Credentials for a client channel: None (plaintext) when neither ``ca`` nor ``cert`` is given;
    ``ca`` verifies the server (empty = the system's roots), ``cert`` and ``key`` are presented to it."""
    pair = _pair(cert, key, "client")
    if not ca and pair is None:
        return None
    root = _read(ca, "server CA bundle") if ca else None
    private_key, chain = pair if pair is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=private_key, certificate_chain=chain)


def channel_options(credentials: grpc.ChannelCredentials | None, server_name: str) -> Sequence[tuple[str, str]]:
    """The channel argument that checks the server's certificate against ``server_name`` (TLS only)."""
    return [(_NAME_OVERRIDE, server_name)] if credentials is not None and server_name else []


def add_port(
    server: grpc.Server | grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind ``host:port`` (an IPv6 host goes in brackets) with TLS when ``credentials`` are given, plaintext
    otherwise; returns the port bound (``port`` 0 = a free one). OSError naming the address when it cannot
    be bound (taken, or not an address of this host), where grpc raises RuntimeError or returns 0."""
    address = join_host_port(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    return bound
