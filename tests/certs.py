"""Certificates made at test time (``cryptography``): a CA, a server certificate, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    pair = Pair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pair


class Authority:
    """A certificate authority in ``folder`` that issues server and client certificates."""

    def __init__(self, folder: Path, name: str = "normserve test CA") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stem = name.replace(" ", "-")
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = (
            self._builder(_name(name), self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = _write(self.folder, self.stem, self._cert, self._key).cert

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, expired: bool = False
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2 if expired else 0)
        issuer = subject if not hasattr(self, "_cert") else self._cert.subject
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, common_name: str, *, server: bool, expired: bool = False) -> Pair:
        """A certificate for a server (names localhost and 127.0.0.1) or a client; ``expired``: one whose day
        of validity ended a day ago."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(_name(common_name), key.public_key(), expired).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.folder, f"{self.stem}-{common_name}", builder.sign(self._key, hashes.SHA256()), key)


def make_pki(folder: Path) -> dict:
    """A CA with a server and a client certificate, expired ones, and a rogue CA with its own client."""
    ca, rogue = Authority(folder), Authority(folder, "rogue CA")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "expired_client": ca.issue("old-client", server=False, expired=True),
        "expired_server": ca.issue("old-server", server=True, expired=True),
        "rogue_client": rogue.issue("client", server=False),
        "rogue_ca": rogue.ca,
    }
