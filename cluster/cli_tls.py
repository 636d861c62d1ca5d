"""TLS flags shared by the ``dsaserve`` subcommands.

Servers (``local``, ``tls-front``): ``--tls-cert F --tls-key F [--tls-client-ca F]``; the client CA
makes it mutual TLS (clients must present a certificate it signed).
Clients (``client generate``, ``client health``, ``status``): ``--tls-ca F [--tls-cert F --tls-key F]
[--tls-server-name NAME]``; ``--tls-ca`` (or a client certificate) turns TLS on.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_server_tls_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    need = "" if required else "; with --tls-key, serve TLS only"
    parser.add_argument("--tls-cert", required=required, metavar="FILE",
                        help=f"PEM certificate chain the server presents{need}")
    parser.add_argument("--tls-key", required=required, metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help="PEM CA bundle: require client certificates it signed (mutual TLS)")


def server_tls(args: argparse.Namespace) -> Any:
    """The ``TLSConfig`` the server flags ask for, or None (plaintext).

    Raises:
        TLSError: one of --tls-cert/--tls-key without the other, --tls-client-ca without them, or a
            file that is missing or unusable (checked now, before a server's slow start-up).
    """
    from router.tls import TLSConfig, TLSError

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise TLSError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise TLSError("--tls-cert and --tls-key go together")
    config = TLSConfig(cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca)
    config.check()
    return config


def add_client_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="PEM CA bundle that signed the server's certificate: connect with TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate (mutual TLS; with --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="name the server's certificate must carry, when not the address's host")


def client_tls(args: argparse.Namespace) -> dict[str, Any]:
    """``Client``/``AsyncClient`` keywords from the client flags."""
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_server_name": args.tls_server_name}
