"""The HTTP API in cluster mode: Serve's HTTP proxy on ``router.http_port`` routes to the router
deployment's ingress, which answers as local mode does (same Frontend, same backend contract)."""

from __future__ import annotations

import json
import time
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


def test_metrics_through_serve_proxy_sum_the_workers(cluster, tiny_dir) -> None:
    """/metrics in cluster mode: the router's own counters, and the workers' (KV transfers over Ray,
    gauges) gathered through the stats board; counters move by what a known request did."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{cluster.config['router']['http_port']}"

    def scrape() -> dict:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    before = scrape()
    ids = list(range(300, 340))  # 40 tokens no earlier test sent: prefilled, then moved to decode
    with Client(cluster.address, timeout=120) as c:
        c.generate(prompt_ids=ids, max_tokens=5, ignore_eos=True)
    time.sleep(1.5)  # the workers' stats reach the board every 0.5 s
    after = scrape()

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("dsaserve:prompt_tokens_total") == 40
    assert delta("dsaserve:generation_tokens_total") == 5
    assert delta("dsaserve:time_to_first_token_seconds_count") == 1
    assert delta("dsaserve:request_success_total", finished_reason="length") == 1
    assert delta("dsaserve:kv_transfer_bytes_total", backend="ray") > 0
    assert ("dsaserve:num_requests_running", ()) in after and ("dsaserve:kv_cache_usage_perc", ()) in after
