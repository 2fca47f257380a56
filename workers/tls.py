"""TLS between the controller and island hosts and between peers: a per-cluster CA and its use.

The controller creates a cluster CA in its state directory the first time it starts with TLS
possible (`<state_dir>/tls/ca.pem`, and `ca.key` mode 0600), and issues each island host a
certificate for its node's address when it starts the host (`ClusterCA.issue`; the host's key
travels with the credential, as a Ray actor call argument, workers/island_host.py). Clients
(the controller, peers) verify a host against the CA and the address they dialled, so a
host on another address, or a man in the middle, fails the handshake. The cluster credential
(workers/auth.py) still authenticates every call: TLS adds secrecy and server identity on the
wire, not who may call.

When TLS is used is one rule both sides apply to an address (`TlsConfig.wanted`):
`--tls on` always, `off` never, `auto` (the default) when the address is not loopback, i.e.
exactly where traffic leaves the machine. A host serves TLS or plaintext on its address by the
same rule, so the controller and the peers agree with it without asking.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

MODES = ("on", "off", "auto")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
_VALID = datetime.timedelta(days=3650)


def is_loopback(address: str) -> bool:
    """Whether the host part of `host:port` (or a bare host) is a loopback address."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsConfig:
    """The cluster's TLS setting and the material one side needs.

    Attributes:
        mode: "on", "off" or "auto" (TLS off loopback).
        ca_pem: The cluster CA's certificate (clients verify servers with it).
        cert_pem, key_pem: A host's certificate and key (servers only).
    """

    mode: str = "auto"
    ca_pem: bytes = b""
    cert_pem: bytes = b""
    key_pem: bytes = b""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--tls {self.mode!r} must be one of {', '.join(MODES)}.")

    def __repr__(self) -> str:  # never the key
        return f"TlsConfig(mode={self.mode!r})"

    def wanted(self, address: str) -> bool:
        """Whether traffic to (or served on) `address` uses TLS."""
        return self.mode == "on" or (self.mode == "auto" and not is_loopback(address))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if not self.ca_pem:
            raise ValueError("TLS is wanted but no cluster CA certificate was given.")
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert_pem and self.key_pem):
            raise ValueError("TLS is wanted but this host has no certificate.")
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def aio_channel(
    address: str, tls: TlsConfig | None, *, options=(), interceptors=()
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: TLS verified against the cluster CA when `tls` wants
    it for that address, else plaintext."""
    if tls is not None and tls.wanted(address):
        return grpc.aio.secure_channel(
            address, tls.channel_credentials(), options=list(options), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def channel(address: str, tls: TlsConfig | None) -> grpc.Channel:
    """A blocking channel to `address` by the same rule (tools, tests, benchmarks)."""
    if tls is not None and tls.wanted(address):
        return grpc.secure_channel(address, tls.channel_credentials())
    return grpc.insecure_channel(address)


class ClusterCA:
    """The cluster's certificate authority: a key and a self-signed certificate on disk.

    Args:
        directory: Where `ca.pem` and `ca.key` (0600) live; created with them when absent.
    """

    def __init__(self, directory: str | Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.directory = Path(directory)
        cert_path, key_path = self.directory / CA_CERT, self.directory / CA_KEY
        if not (cert_path.exists() and key_path.exists()):
            self._create(cert_path, key_path)
        if key_path.stat().st_mode & 0o077:
            raise PermissionError(
                f"the cluster CA key {str(key_path)!r} is readable by others (chmod 600)."
            )
        self.cert_pem = cert_path.read_bytes()
        self._cert = x509.load_pem_x509_certificate(self.cert_pem)
        self._key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)

    def _create(self, cert_path: Path, key_path: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pathways_lite cluster CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # A new file of mode 0600, then renamed over the path: an old key file others can
        # read (or a link there) never receives the new key (it was written into it).
        tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem_key)
        os.replace(tmp, key_path)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        logger.info("created the cluster CA in %s", self.directory)

    def issue(self, host: str, mode: str) -> TlsConfig:
        """A certificate and key for a server at `host` (an IP address or a DNS name)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALID)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        return TlsConfig(
            mode,
            self.cert_pem,
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    def client(self, mode: str) -> TlsConfig:
        """What a client (the controller) needs: the mode and the CA certificate."""
        return TlsConfig(mode, self.cert_pem)
