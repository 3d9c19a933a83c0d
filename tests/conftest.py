"""Fixtures shared by every tier of tests (the fakes they use are in tests/fakes.py): torch threads, the
SmolLM2 tokenizer, and a throw-away PKI (two CAs and their certificates) for the TLS tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscribing cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from specdec.models import load_tokenizer

    return load_tokenizer("smollm2")


# --- a throw-away PKI for the TLS tests ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class Pki:
    """Two unrelated CAs; a server and a client certificate from ``ca``, a client certificate from ``rogue_ca``.

    The server certificate names 127.0.0.1 and ``SERVER_NAME``; ``named_server`` names only ``SERVER_NAME``
    (a replica reached by address whose certificate names the service); ``server_and_client`` names only
    ``SERVER_NAME`` and may also be presented as a client's (a Triton's own, for its liveness probes)."""

    ca: str
    server: Leaf
    named_server: Leaf
    server_and_client: Leaf
    client: Leaf
    rogue_ca: str
    rogue_client: Leaf


SERVER_NAME = "specdec.test"


def _write_pki(folder: Path) -> Pki:
    """Generated at run time with ``cryptography``: EC P-256 keys, valid for a day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Leaf:
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))  # fmt: skip
        return Leaf(str(cert_path), str(key_path))

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )  # fmt: skip

    def ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(common, name(common), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key, save(common.replace(" ", "-"), cert, key).cert

    def leaf(stem: str, issuer: tuple, usage: list[x509.ObjectIdentifier], names: list[x509.GeneralName]) -> Leaf:
        issuer_cert, issuer_key, _ = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(stem, issuer_cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.SubjectAlternativeName(names or [x509.DNSName(stem)]), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )
        return save(stem, cert, key)

    good, rogue = ca("specdec test CA"), ca("rogue CA")
    server_auth, client_auth = [ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.CLIENT_AUTH]
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(SERVER_NAME)]
    return Pki(
        ca=good[2],
        server=leaf("server", good, server_auth, loopback),
        named_server=leaf("named-server", good, server_auth, [x509.DNSName(SERVER_NAME)]),
        server_and_client=leaf("server-and-client", good, server_auth + client_auth, [x509.DNSName(SERVER_NAME)]),
        client=leaf("client", good, client_auth, []),
        rogue_ca=rogue[2],
        rogue_client=leaf("rogue-client", rogue, client_auth, []),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"))
