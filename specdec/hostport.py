"""``host:port`` for IPv4, IPv6 and names alike: the one place the stack joins a host and a port.

Why it exists: an operator may bind the services to an IPv6 address (``--host ::1``, or ``::`` for every
address of a dual-stack pod). Written naively, ``f"{host}:{port}"`` gives ``::1:8001``, which gRPC and HTTP
clients cannot parse; and a socket opened as IPv4 cannot bind an IPv6 address at all. Every server, URL
and free-port pick of ours goes through these two helpers instead.
"""

from __future__ import annotations

import socket


def bare_host(host: str) -> str:
    """``host`` without the brackets an IPv6 literal may come in (``[::1]`` -> ``::1``), as sockets take it."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:8001``), whether or not it came in them."""
    bare = bare_host(host)
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def address_family(host: str) -> socket.AddressFamily:
    """The socket family that binds ``host``: AF_INET6 for an IPv6 literal (bracketed or not), otherwise the
    first family the resolver gives a name (AF_INET for an IPv4 literal). OSError naming the host when it
    does not resolve."""
    bare = bare_host(host)
    if ":" in bare:
        return socket.AF_INET6
    try:
        return socket.getaddrinfo(bare, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
