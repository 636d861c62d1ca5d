"""Cluster mode with ``router.tls``: `dsaserve serve` moves Serve's plaintext gRPC proxy to
``tls.upstream_port`` and runs the TLS front on ``grpc_port``; API keys pass through both hops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from router.client import Client, DsaServeError
from tests.tls_certs import make_authority

from ..redis_server import free_port
from .conftest import start_cluster

pytestmark = pytest.mark.slow
KEY = "cluster-key-aaaaaaaa"


@pytest.fixture(scope="module")
def tls_cluster(cluster_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster-tls")
    ca = make_authority(tmp / "pki", "ours")
    mp = pytest.MonkeyPatch()
    mp.setenv("DSASERVE_API_KEYS", KEY)  # inherited by `dsaserve serve`, its Ray and the router replica
    tls = {"cert_file": ca.server_cert, "key_file": ca.server_key, "upstream_port": free_port()}
    try:
        running = start_cluster(tmp, cluster_ckpt, "ray", decode_replicas=1, router={"tls": tls})
    finally:
        mp.undo()
    running.ca = ca
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def test_cluster_serves_tls_on_the_public_port(tls_cluster) -> None:
    ca, address = tls_cluster.ca, tls_cluster.address
    assert "with TLS" in tls_cluster.log.read_text()
    with Client(address, timeout=120, tls_ca=ca.ca, api_key=KEY) as c:
        out = c.generate(prompt_ids=[0, 5, 6, 7], max_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4 and out.finish_reason == "length"
        assert c.health() == "SERVING"
    with Client(address, timeout=10, api_key=KEY) as plain, pytest.raises(DsaServeError) as info:
        plain.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    upstream = f"127.0.0.1:{tls_cluster.config['router']['tls']['upstream_port']}"
    with Client(upstream, timeout=30) as behind:  # Serve's own proxy, plaintext, behind the front
        assert behind.health() == "SERVING"


def test_api_keys_hold_through_the_front_and_serve_proxy(tls_cluster) -> None:
    ca, address = tls_cluster.ca, tls_cluster.address
    with Client(address, timeout=60, tls_ca=ca.ca, api_key="wrong-key-aaaaaaaa") as c:
        with pytest.raises(DsaServeError) as info:
            c.list_models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", address, "--tls-ca", ca.ca,
                          "--json"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DSASERVE_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["workers"]) == 2  # one prefill, one decode replica
