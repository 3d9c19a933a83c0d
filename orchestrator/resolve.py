"""Where a replica pool's replicas are: a comma-separated list of endpoints, names resolved to all their addresses.

Why it exists: a pool is given as ``10.0.0.5:8001,10.0.0.6:8001`` or as one name (``specdec-triton:8001``,
a Kubernetes headless Service) that resolves to every pod's address; the pool re-resolves it periodically
to follow pods coming and going. An address literal is its own replica; a name becomes one replica per
address it resolves to. ``dns:///name:port`` (gRPC's target syntax) is accepted too.

Names are resolved with the system resolver (``loop.getaddrinfo``: /etc/hosts, cluster DNS), the same one
gRPC's own ``native`` resolver uses; a name resolving to no address, or failing to resolve, is reported
to the caller, which keeps the addresses it had (a DNS hiccup must not empty a pool).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from specdec.hostport import join_host_port

_DNS_SCHEME = "dns:///"

# (host, port) -> the IP addresses it resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class Endpoint:
    """One entry of a pool's list: an address literal or a name, and a port."""

    host: str
    port: int

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True)
class Address:
    """One replica: ``address`` (ip:port) to connect to; ``server_name``, the name it was resolved from ('' for
    an address literal), is what TLS checks the replica's certificate against."""

    address: str
    server_name: str


def parse_endpoints(spec: str) -> list[Endpoint]:
    """``"a:1, b:2"`` -> [Endpoint("a", 1), Endpoint("b", 2)]; ValueError naming the bad entry."""
    endpoints = []
    for raw in spec.split(","):
        entry = raw.strip()
        if entry.startswith(_DNS_SCHEME):
            entry = entry[len(_DNS_SCHEME) :]
        if not entry:
            continue
        if entry.startswith("["):  # [v6]:port
            host, sep, port = entry[1:].partition("]:")
        else:
            host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint {raw.strip()!r} is not host:port (port 1-65535)")
        endpoints.append(Endpoint(host, int(port)))
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"endpoints {spec!r} list the same endpoint twice")
    return endpoints


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def resolve(endpoint: Endpoint, resolver: Resolver = system_resolver) -> list[Address]:
    """The replicas behind ``endpoint``; OSError if a name does not resolve (or resolves to nothing)."""
    if not endpoint.is_name:
        return [Address(str(endpoint), "")]
    hosts = await resolver(endpoint.host, endpoint.port)
    if not hosts:
        raise OSError(f"{endpoint.host} resolved to no address")
    return [Address(join_host_port(h, endpoint.port), endpoint.host) for h in sorted(set(hosts))]
