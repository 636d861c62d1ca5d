"""TLS for the gRPC API: server credentials (optionally mutual TLS) and client channel credentials,
both from PEM files.

    tls = TLSConfig(cert_file="server.crt", key_file="server.key", client_ca_file="clients-ca.crt")
    server.add_secure_port("0.0.0.0:50051", server_credentials(tls))     # clients must present a cert
    channel = grpc.secure_channel(addr, ClientTLS(ca_file="ca.crt").credentials())

Files are checked when the credentials are built, so a missing file, one that is not PEM, or a key
that does not belong to its certificate is an error naming the file, not a failed handshake later.
The server re-reads its files when they change (a rotated Kubernetes Secret, cert-manager), on the
next connection; connections already open keep the certificate they started with.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class TLSError(OSError):
    """A TLS setting that cannot be used: a missing, unreadable or non-PEM file, a key that does not
    match its certificate, a certificate without its key. The message names the file or setting.
    (An ``OSError``, so the CLI reports it as one line.)"""


class TLSConfig(BaseModel):
    """Server-side TLS: the certificate chain and key the server presents, and optionally the CA that
    client certificates must chain to (then every client must present one: mutual TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: str = Field(..., description="PEM certificate chain the server presents (leaf first)")
    key_file: str = Field(..., description="PEM private key of that certificate (unencrypted)")
    client_ca_file: str | None = Field(
        None, description="PEM CA bundle; set: clients must present a certificate it signed (mutual TLS)")

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def check(self) -> None:
        """Read and parse the files now (a server checks them before its slow start-up).

        Raises:
            TLSError: a file is missing, unreadable or not PEM, or the key does not match the certificate.
        """
        _certificate_configuration(self)


class TLSFrontConfig(TLSConfig):
    """TLS for a server that cannot speak it itself (Ray Serve's gRPC proxy): that server listens in
    plaintext on ``upstream_port`` and a TLS front (router/tls_front.py) takes the public port."""

    upstream_port: int = Field(
        50052, ge=1, le=65535, description="port of the plaintext gRPC server behind the TLS front (cluster "
        "mode: Serve's gRPC proxy, which binds every interface: keep the port firewalled)")


@dataclass(frozen=True)
class ClientTLS:
    """Client-side TLS: the CA bundle that verifies the server (None: the system's roots), a client
    certificate and key for mutual TLS, and the name to verify instead of the address's host."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TLSError("a client certificate needs its key: give both tls_cert and tls_key, or neither")

    @classmethod
    def from_options(cls, ca: str | None = None, cert: str | None = None, key: str | None = None,
                     server_name: str | None = None) -> ClientTLS | None:
        """The client TLS the SDK and CLI options ask for: None (plaintext) unless a CA bundle or a
        client certificate is given."""
        if ca is None and cert is None and key is None:
            if server_name is not None:
                raise TLSError("tls_server_name needs TLS: give tls_ca (the CA bundle that signed the server)")
            return None
        return cls(ca, cert, key, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        """``grpc.ssl_channel_credentials`` from the files (read now).

        Raises:
            TLSError: a file is missing, unreadable or not PEM, or the key does not match the certificate.
        """
        root = read_pem(self.ca_file, "CA bundle") if self.ca_file else None
        if self.cert_file is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        assert self.key_file is not None
        _check_key_pair(self.cert_file, self.key_file, "client")
        return grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=read_pem(self.key_file, "client key"),
            certificate_chain=read_pem(self.cert_file, "client certificate"),
        )

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the server name to verify, when it differs from the address's host."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def read_pem(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a PEM file.

    Raises:
        TLSError: naming ``what`` and the path, when the file cannot be read or holds no PEM block.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSError(f"cannot read TLS {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TLSError(f"TLS {what} {path} is not PEM (no -----BEGIN line)")
    return data


def server_credentials(config: TLSConfig) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; with ``client_ca_file``, clients without a
    certificate signed by that CA are refused during the handshake. The files are re-read on the first
    connection after one of them changed.

    Raises:
        TLSError: a file is missing, unreadable or not PEM, or the key does not match the certificate.
    """
    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(config), _Reloader(config), require_client_authentication=config.mutual
    )


def _certificate_configuration(config: TLSConfig) -> grpc.ServerCertificateConfiguration:
    _check_key_pair(config.cert_file, config.key_file, "server")
    ca = None
    if config.client_ca_file is not None:
        ca = read_pem(config.client_ca_file, "client CA bundle")
        try:
            ssl.create_default_context(cafile=config.client_ca_file)
        except ssl.SSLError as e:
            raise TLSError(f"TLS client CA bundle {config.client_ca_file} holds no usable certificate ({e.reason})") from None
    pair = (read_pem(config.key_file, "server key"), read_pem(config.cert_file, "server certificate"))
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)


def _check_key_pair(cert_file: str, key_file: str, role: str) -> None:
    """Parse the certificate and key with OpenSSL: gRPC itself would only fail the handshake."""
    read_pem(cert_file, f"{role} certificate")
    read_pem(key_file, f"{role} key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as e:
        reason = "the key does not match the certificate" if "MISMATCH" in str(e) else \
            "unparsable certificate or key, or an encrypted key"
        raise TLSError(f"TLS {role} certificate {cert_file} / key {key_file}: {reason} ({e.reason})") from None


class _Reloader:
    """gRPC's certificate fetcher, called before each handshake: new credentials when a file's
    modification time or size changed, else None (keep the current ones). A failed reload keeps the
    current credentials and logs why."""

    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self.stamp = self._stamp()
        self.failed: tuple | None = None  # the stamp whose files did not load (logged once)

    def _stamp(self) -> tuple:
        files = (self.config.cert_file, self.config.key_file, self.config.client_ca_file)
        stamp = []
        for f in files:
            try:
                st = os.stat(f) if f else None  # follows Kubernetes' ..data symlink swap
            except OSError:
                st = None
            stamp.append((st.st_mtime_ns, st.st_size, st.st_ino) if st else None)
        return tuple(stamp)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stamp()
        if stamp in (self.stamp, self.failed):
            return None
        try:
            fresh = _certificate_configuration(self.config)
        except Exception as e:  # noqa: BLE001 — raised into gRPC's handshake it would drop the connection
            log.warning("TLS files changed but cannot be loaded; keeping the current certificate: %s", e)
            self.failed = stamp
            return None
        self.stamp = stamp
        log.info("TLS certificate reloaded from %s", self.config.cert_file)
        return fresh
