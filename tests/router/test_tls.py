"""TLS on real gRPC servers (127.0.0.1, the session's LocalBackend, certificates made here): TLS and
mutual TLS in local mode, the client SDK and CLI, the TLS front that cluster mode puts before Serve's
plaintext proxy, and API keys (constant-time comparison; health open without a key)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.cli_serve import main as serve_main
from router import wire
from router.client import AsyncClient, Client, DsaServeError, make_request
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc
from router.server import server_port, start_server
from router.tls import TLSConfig, TLSError, TLSFrontConfig, server_credentials
from router.tls_front import TLSFront
from tests.router.conftest import ServerThread
from tests.router.test_server import wait_idle
from tests.tls_certs import Authority, make_authority

GREEDY = {"max_tokens": 4, "ignore_eos": True}
PROMPT = [0, 4853, 1060, 42]
FAST = 10  # seconds: the deadline of calls that are expected to fail at the handshake


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Authority]:
    """Our CA and another one (its certificates must be refused)."""
    folder = tmp_path_factory.mktemp("pki")
    return make_authority(folder, "ours"), make_authority(folder, "other")


def _server_tls(a: Authority, *, mutual: bool = False) -> TLSConfig:
    return TLSConfig(cert_file=a.server_cert, key_file=a.server_key, client_ca_file=a.ca if mutual else None)


class Started:
    """Extra servers and fronts on the session server's event loop (and backend), stopped at the end."""

    def __init__(self, server: ServerThread) -> None:
        self.server, self.stops = server, []

    def grpc(self, **kwargs) -> str:
        srv = self.server.run(start_server(self.server.backend, None, "127.0.0.1", 0, **kwargs))
        self.stops.append(lambda: srv.stop(0))
        return f"127.0.0.1:{server_port(srv)}"

    def front(self, upstream: str, tls: TLSConfig) -> str:
        front = self.server.run(TLSFront.start("127.0.0.1:0", upstream, tls))
        self.stops.append(lambda: front.stop(0))
        return f"127.0.0.1:{front.port}"

    def close(self) -> None:
        for stop in reversed(self.stops):
            self.server.run(stop())


@pytest.fixture(scope="module")
def started(server: ServerThread) -> Iterator[Started]:
    s = Started(server)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tls_address(started: Started, pki) -> str:
    return started.grpc(tls=_server_tls(pki[0]))


@pytest.fixture(scope="module")
def mtls_address(started: Started, pki) -> str:
    return started.grpc(tls=_server_tls(pki[0], mutual=True))


def _refused(address: str, **kwargs) -> DsaServeError:
    with Client(address, timeout=FAST, **kwargs) as c, pytest.raises(DsaServeError) as info:
        c.list_models()
    return info.value


# ---- local mode: TLS and mutual TLS ---------------------------------------------------------------


def test_tls_client_gets_the_same_tokens_as_plaintext(server: ServerThread, tls_address: str, pki) -> None:
    ours = pki[0]
    with Client(server.address, timeout=60) as plain:
        want = plain.generate(prompt_ids=PROMPT, **GREEDY).token_ids
    with Client(tls_address, timeout=60, tls_ca=ours.ca) as c:
        assert c.generate(prompt_ids=PROMPT, **GREEDY).token_ids == want
        assert tuple(t for d in c.generate_stream(prompt_ids=PROMPT, **GREEDY) for t in d.token_ids) == want
        assert c.health() == "SERVING"

    async def run() -> tuple[int, ...]:
        async with AsyncClient(tls_address, timeout=60, tls_ca=ours.ca) as ac:
            return (await ac.generate(prompt_ids=PROMPT, **GREEDY)).token_ids

    assert asyncio.run(run()) == want


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_address: str) -> None:
    assert _refused(tls_address).code == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_is_refused(tls_address: str, pki) -> None:
    assert _refused(tls_address, tls_ca=pki[1].ca).code == grpc.StatusCode.UNAVAILABLE


def test_the_server_name_is_verified(tls_address: str, pki) -> None:
    ca = pki[0].ca
    port = tls_address.rsplit(":", 1)[1]
    with Client(f"localhost:{port}", timeout=30, tls_ca=ca) as c:  # a DNS name of the certificate
        assert c.health() == "SERVING"
    with Client(tls_address, timeout=30, tls_ca=ca, tls_server_name="dsaserve.test") as c:
        assert c.health() == "SERVING"
    assert _refused(tls_address, tls_ca=ca, tls_server_name="elsewhere.test").code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_address: str, pki) -> None:
    ours, other = pki
    assert _refused(mtls_address, tls_ca=ours.ca).code == grpc.StatusCode.UNAVAILABLE
    assert _refused(mtls_address, tls_ca=ours.ca, tls_cert=other.client_cert,
                    tls_key=other.client_key).code == grpc.StatusCode.UNAVAILABLE
    with Client(mtls_address, timeout=60, tls_ca=ours.ca, tls_cert=ours.client_cert, tls_key=ours.client_key) as c:
        assert len(c.generate(prompt_ids=PROMPT, **GREEDY).token_ids) == 4


def test_bad_tls_files_are_errors_naming_the_file(tmp_path: Path, pki) -> None:
    ours, other = pki
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(TLSError, match="nope.crt"):
        server_credentials(TLSConfig(cert_file=missing, key_file=ours.server_key))
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello")
    with pytest.raises(TLSError, match=r"junk\.pem is not PEM"):
        server_credentials(TLSConfig(cert_file=ours.server_cert, key_file=ours.server_key, client_ca_file=str(not_pem)))
    with pytest.raises(TLSError, match="does not match"):
        server_credentials(TLSConfig(cert_file=ours.server_cert, key_file=other.server_key))
    with pytest.raises(TLSError, match="tls_key"):
        Client("127.0.0.1:1", tls_ca=ours.ca, tls_cert=ours.client_cert)
    with pytest.raises(TLSError, match="nope.crt"):
        Client("127.0.0.1:1", tls_ca=missing)
    with pytest.raises(ValueError, match="extra"):  # the edge config forbids unknown keys
        TLSConfig.model_validate({"cert_file": "a", "key_file": "b", "client_ca": "c"})


def test_a_rotated_certificate_is_served_to_new_connections(started: Started, pki, tmp_path: Path) -> None:
    ours, other = pki
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(ours.server_cert, cert)
    shutil.copy(ours.server_key, key)
    address = started.grpc(tls=TLSConfig(cert_file=str(cert), key_file=str(key)))
    with Client(address, timeout=30, tls_ca=ours.ca) as c:
        assert c.health() == "SERVING"
    # As a Kubernetes Secret volume updates: new files swapped in at once.
    for src, dst in ((other.server_cert, cert), (other.server_key, key)):
        shutil.copy(src, f"{dst}.new")
        os.replace(f"{dst}.new", dst)
    with Client(address, timeout=30, tls_ca=other.ca) as c:
        assert c.health() == "SERVING"
    assert _refused(address, tls_ca=ours.ca).code == grpc.StatusCode.UNAVAILABLE


# ---- API keys ---------------------------------------------------------------------------------------


def test_api_keys_guard_everything_but_health(started: Started, pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSASERVE_API_KEYS", "key-one-aaaaaaaa,key-two-bbbbbbbb")
    address = started.grpc()
    front = started.front(address, _server_tls(pki[0]))  # the key travels through the TLS front too
    for addr, tls in ((address, {}), (front, {"tls_ca": pki[0].ca})):
        for key in (None, "key-one-aaaaaaaX", "key-one-aaaaaaaa-and-more", "", "Bearer"):
            with Client(addr, timeout=30, api_key=key, **tls) as c:
                for call in (c.list_models, lambda: c.generate(prompt_ids=PROMPT, max_tokens=1), c.status):
                    with pytest.raises(DsaServeError) as info:
                        call()
                    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED, (addr, key)
                assert c.health() == "SERVING"  # probes need no key
        with Client(addr, timeout=60, api_key="key-two-bbbbbbbb", **tls) as c:
            assert c.list_models()[0].vocab_size == 129280
            assert len(c.generate(prompt_ids=PROMPT, **GREEDY).token_ids) == 4


# ---- the TLS front ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def front(started: Started, server: ServerThread, pki) -> str:
    return started.front(server.address, _server_tls(pki[0]))


def test_front_forwards_streams_batches_and_health(server: ServerThread, front: str, pki) -> None:
    with Client(server.address, timeout=60) as direct, Client(front, timeout=60, tls_ca=pki[0].ca) as c:
        assert c.health() == direct.health() == "SERVING"
        assert c.health("dsaserve.v1.DsaServe") == "SERVING"
        want = [d.token_ids for d in direct.generate_stream(prompt_ids=PROMPT, **GREEDY)]
        got = [d.token_ids for d in c.generate_stream(prompt_ids=PROMPT, **GREEDY)]
        assert got == want and len(got) > 1  # streamed: several messages came through
        assert c.tokenize("Hello, world") == direct.tokenize("Hello, world")
        batch = [{"id": f"b{i}", "prompt_ids": [0, 7 + i], **GREEDY} for i in range(6)]
        via_front = {r.request_id: r.completion.token_ids for r in c.generate_batch(batch)}
        assert via_front == {r.request_id: r.completion.token_ids for r in direct.generate_batch(batch)}
    assert _refused(front).code == grpc.StatusCode.UNAVAILABLE  # the front itself is TLS only


def _raw_error(address: str, ca: str, **kwargs) -> grpc.RpcError:
    """The status of a Generate that fails, read with plain grpc (trailing metadata and all)."""
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes())) as channel:
        request = wire.request_to_proto(make_request(**kwargs), stream=True)
        with pytest.raises(grpc.RpcError) as raw:
            list(pb_grpc.DsaServeStub(channel).Generate(request, timeout=30))
    return raw.value


def test_front_relays_errors_with_their_trailing_metadata(server: ServerThread, front: str, pki,
                                                          small_queue_server: ServerThread, started: Started) -> None:
    with Client(server.address, timeout=60) as direct, Client(front, timeout=60, tls_ca=pki[0].ca) as c:
        errors = []
        for client in (direct, c):
            with pytest.raises(DsaServeError) as info:
                client.generate(prompt_ids=[5, 6], temperature=-0.1)
            errors.append(info.value)
        assert errors[1].code == grpc.StatusCode.INVALID_ARGUMENT and errors[1].field == "temperature"
        assert (errors[1].message, errors[1].field) == (errors[0].message, errors[0].field)
    # The trailing metadata itself comes through, not only what the details say.
    raw = _raw_error(front, pki[0].ca, prompt_ids=[5, 6], temperature=-0.1)
    assert raw.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (wire.FIELD_KEY, "temperature") in tuple(raw.trailing_metadata())
    queue_front = started.front(small_queue_server.address, _server_tls(pki[0]))
    with Client(queue_front, timeout=60, tls_ca=pki[0].ca) as c:
        running = c.generate_stream(prompt_ids=[0, 5], max_tokens=200, ignore_eos=True)
        next(running)  # the queue of one is full now
        with pytest.raises(DsaServeError) as info:
            c.generate(prompt_ids=[0, 7], max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after_s
        assert wire.RETRY_PUSHBACK_KEY in dict(_raw_error(queue_front, pki[0].ca, prompt_ids=[0, 7]).trailing_metadata())
        running.close()
        wait_idle(small_queue_server)


def test_front_cancels_upstream_calls_both_ways(server: ServerThread, front: str, pki) -> None:
    with Client(front, timeout=60, tls_ca=pki[0].ca) as c:
        stream = c.generate_stream(prompt_ids=[0, 9], max_tokens=200, ignore_eos=True)
        next(stream)
        stream.close()  # the client cancels: the front cancels upstream, which aborts the request
        wait_idle(server)
        with pytest.raises(DsaServeError) as info:  # the deadline travels upstream
            c.generate(prompt_ids=[0, 5], max_tokens=200, ignore_eos=True, timeout=0.5)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(server)


def test_front_with_mutual_tls_and_a_missing_upstream(started: Started, server: ServerThread, pki) -> None:
    ours = pki[0]
    mutual = started.front(server.address, _server_tls(ours, mutual=True))
    assert _refused(mutual, tls_ca=ours.ca).code == grpc.StatusCode.UNAVAILABLE
    with Client(mutual, timeout=30, tls_ca=ours.ca, tls_cert=ours.client_cert, tls_key=ours.client_key) as c:
        assert c.health() == "SERVING"
    nowhere = started.front("127.0.0.1:1", _server_tls(ours))
    error = _refused(nowhere, tls_ca=ours.ca)
    assert error.code == grpc.StatusCode.UNAVAILABLE


# ---- CLI ----------------------------------------------------------------------------------------------


def test_client_health_and_generate_cli(capsys: pytest.CaptureFixture[str], tls_address: str, pki) -> None:
    ca = pki[0].ca
    assert serve_main(["client", "health", "--address", tls_address, "--tls-ca", ca]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert serve_main(["client", "health", "--address", tls_address, "--timeout", "3"]) == 1  # plaintext: refused
    assert serve_main(["client", "health", "--address", tls_address, "--tls-ca", ca, "--service", "no.Such"]) == 1
    capsys.readouterr()
    argv = ["client", "generate", "--address", tls_address, "--tls-ca", ca, "--prompt-ids", "0,5,6", "--max-tokens", "2",
            "--ignore-eos", "--json"]
    assert serve_main(argv) == 0 and '"token_ids"' in capsys.readouterr().out
    assert serve_main(["client", "health", "--tls-ca", ca, "--tls-cert", pki[0].client_cert]) == 2  # no --tls-key
    assert "tls_key" in capsys.readouterr().err


def test_local_and_tls_front_commands(tiny_dir: Path, server: ServerThread, pki, capsys) -> None:
    """``dsaserve local`` with mutual TLS and ``dsaserve tls-front``, as processes, until SIGTERM."""
    ours = pki[0]
    assert serve_main(["local", "--model", str(tiny_dir), "--tls-cert", ours.server_cert]) == 2  # before loading
    assert "--tls-key" in capsys.readouterr().err
    mtls = ["--tls-ca", ours.ca, "--tls-cert", ours.client_cert, "--tls-key", ours.client_key]
    commands = {
        "local": ["local", "--model", str(tiny_dir), "--port", "0", "--tls-cert", ours.server_cert,
                  "--tls-key", ours.server_key, "--tls-client-ca", ours.ca],
        "tls-front": ["tls-front", "--listen", "127.0.0.1:0", "--upstream", server.address,
                      "--tls-cert", ours.server_cert, "--tls-key", ours.server_key, "--tls-client-ca", ours.ca],
    }
    for name, argv in commands.items():
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = proc.stdout.readline()
            assert "mutual TLS" in line, line + proc.stderr.read()
            address = line.split(" on ")[1].split()[0].rstrip(",")
            assert serve_main(["client", "health", "--address", address, *mtls]) == 0, name
            assert serve_main(["client", "health", "--address", address, "--tls-ca", ours.ca, "--timeout", "3"]) == 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_cluster_config_takes_tls(pki) -> None:
    from cluster.config import ClusterConfig

    ours = pki[0]
    config = ClusterConfig.model_validate({"model": "tiny", "router": {"tls": {
        "cert_file": ours.server_cert, "key_file": ours.server_key, "client_ca_file": ours.ca, "upstream_port": 50099}}})
    assert isinstance(config.router.tls, TLSFrontConfig) and config.router.tls.mutual
    assert config.router.tls.upstream_port == 50099 and ClusterConfig(model="tiny").router.tls is None
    with pytest.raises(ValueError, match="upstream_prot"):
        ClusterConfig.model_validate({"model": "tiny", "router": {"tls": {
            "cert_file": "a", "key_file": "b", "upstream_prot": 1}}})
