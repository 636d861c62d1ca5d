"""The HTTP API in cluster mode: Serve's HTTP proxy on ``router.http_port`` routes to the router
deployment's ingress, which answers as local mode does (same Frontend, same backend contract)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from router.client import Client
from tests.cluster.conftest import start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    """One prefill and one decode replica on the tiny checkpoint with its tokenizer."""
    running = start_cluster(tmp_path_factory.mktemp("cluster-http"), tiny_dir, "ray", decode_replicas=1)
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def test_http_through_serve_proxy_equals_grpc(cluster, tiny_dir) -> None:
    url = f"http://127.0.0.1:{cluster.config['router']['http_port']}"
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in api.models.list().data] == [tiny_dir.name]
    ids = [5, 17, 99, 3, 250]
    whole = api.completions.create(model=tiny_dir.name, prompt=ids, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    with Client(cluster.address, timeout=120) as c:
        g = c.generate(prompt_ids=ids, max_tokens=6, ignore_eos=True)
    assert whole.usage.completion_tokens == len(g.token_ids) == 6 and whole.choices[0].text == g.text
    chat = api.chat.completions.create(model=tiny_dir.name, messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3
    chunks = list(api.completions.create(model=tiny_dir.name, prompt=ids, max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=tiny_dir.name, prompt=ids, top_p=0)
    assert e.value.param == "top_p"
