"""``cluster.k8s.Kube`` with the real ``kubernetes`` client over a fake HTTP transport: the requests it
sends (paths, patch type, selectors) and how API errors read."""

from __future__ import annotations

import json
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client

from cluster.k8s import K8sError, Kube


class Transport:
    def __init__(self, status: int = 200, payload: dict | None = None) -> None:
        self.status, self.payload = status, payload or {}
        self.calls: list[dict] = []

    def __call__(self, method, url, query_params=None, headers=None, body=None, **_):
        query = dict(parse_qsl(urlsplit(url).query)) | dict(query_params or [])  # in the URL or apart, by version
        self.calls.append({"method": method, "url": url.split("?")[0], "query": query, "headers": headers or {},
                           "body": body})
        r = mock.Mock(status=self.status, reason="Not Found" if self.status == 404 else "OK",
                      data=json.dumps(self.payload).encode())
        r.getheaders.return_value = {}
        r.getheader.return_value = None
        r.headers = {}
        return r


def _kube(transport: Transport) -> tuple[Kube, mock._patch]:
    config = client.Configuration()
    config.host = "https://k8s.example:6443"
    api = client.ApiClient(config)
    kube = Kube(api)
    patcher = mock.patch.object(api.rest_client, "request", side_effect=transport)
    patcher.start()
    return kube, patcher


@pytest.fixture
def http():
    transport = Transport(payload={"items": [], "kind": "RayService"})
    kube, patcher = _kube(transport)
    yield kube, transport
    patcher.stop()


def test_patch_is_a_merge_patch_of_the_rayservice(http):
    kube, transport = http
    kube.patch_rayservice("llm", "dsaserve", {"spec": {"serveConfigV2": "x"}})
    (call,) = transport.calls
    assert call["method"] == "PATCH"
    assert call["url"] == "https://k8s.example:6443/apis/ray.io/v1/namespaces/llm/rayservices/dsaserve"
    assert call["headers"]["Content-Type"] == "application/merge-patch+json"
    assert call["body"] == {"spec": {"serveConfigV2": "x"}}


def test_reads_use_the_chart_labels(http):
    kube, transport = http
    kube.get_rayservice("llm", "dsaserve")
    kube.list_rayservices("llm")
    transport.payload = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
        {"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": [{"name": "c"}]}}]}
    pods = kube.list_pods("llm", "app.kubernetes.io/instance=dsaserve")
    assert [c["method"] for c in transport.calls] == ["GET", "GET", "GET"]
    assert transport.calls[1]["query"]["labelSelector"] == "app.kubernetes.io/part-of=dsaserve"
    assert transport.calls[2]["url"].endswith("/api/v1/namespaces/llm/pods")
    assert pods == [{"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": [{"name": "c"}]}}]


@pytest.mark.parametrize("status, message", [(404, "not found (is the chart installed"), (403, "not allowed (403)")])
def test_api_errors_say_what_to_check(status, message):
    kube, patcher = _kube(Transport(status=status, payload={"kind": "Status"}))
    try:
        with pytest.raises(K8sError, match=r"RayService llm/dsaserve: " + message.replace("(", r"\(").replace(")", r"\)")):
            kube.get_rayservice("llm", "dsaserve")
    finally:
        patcher.stop()
