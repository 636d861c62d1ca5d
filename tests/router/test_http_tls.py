"""The HTTP API over TLS and mutual TLS (the gRPC server's TLSConfig, certificates made here), and
``GET /metrics`` beside it."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from router.frontend import Frontend
from router.http import build_app, start_http_server
from router.tls import TLSConfig
from tests.router.conftest import ServerThread
from tests.tls_certs import Authority, make_authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Authority]:
    folder = tmp_path_factory.mktemp("pki-http")
    return make_authority(folder, "ours"), make_authority(folder, "other")


@pytest.fixture(scope="module")
def mtls_url(server: ServerThread, tokenizer, pki) -> Iterator[str]:
    ours = pki[0]
    tls = TLSConfig(cert_file=ours.server_cert, key_file=ours.server_key, client_ca_file=ours.ca)
    app = build_app(Frontend(server.backend, tokenizer), api_keys=frozenset())
    http = server.run(start_http_server(app, "127.0.0.1", 0, tls=tls))
    yield f"https://127.0.0.1:{http.port}"
    server.run(http.stop(0))


def get(url: str, context: ssl.SSLContext) -> tuple[int, dict]:
    with urllib.request.urlopen(url, context=context, timeout=30) as r:
        return r.status, json.loads(r.read())


def context(a: Authority, *, client: Authority | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=a.ca)
    if client is not None:
        ctx.load_cert_chain(client.client_cert, client.client_key)
    return ctx


def test_mutual_tls(mtls_url: str, pki) -> None:
    ours, other = pki
    status, body = get(mtls_url + "/v1/models", context(ours, client=ours))
    assert status == 200 and body["data"][0]["owned_by"] == "dsaserve"
    for ctx in (context(ours, client=None), context(ours, client=other), context(other, client=ours)):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(mtls_url + "/health", ctx)


def test_metrics_are_served(server: ServerThread, tokenizer) -> None:
    pytest.importorskip("router.metrics")
    app = build_app(Frontend(server.backend, tokenizer), api_keys=frozenset({"k"}))
    http = server.run(start_http_server(app, "127.0.0.1", 0))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            assert b"# TYPE" in r.read()
    finally:
        server.run(http.stop(0))
