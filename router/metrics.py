"""Prometheus metrics of one router: request timings and token counts, worker load, KV traffic.

Names follow vLLM's (``vllm:`` → ``dsaserve:``) with a ``model_name`` label, so dashboards and
autoscalers written for vLLM carry over. Each backend has its own ``RouterMetrics`` and registry
(never the process-wide default), so several servers in one process never collide.

Where each number comes from:
- Per request, observed by the ``Frontend`` through a ``RequestMetrics`` (``RouterMetrics.request``):
  ``time_to_first_token_seconds`` (router arrival, before tokenization, → first token at the router),
  ``inter_token_latency_seconds`` (gap between two outputs, split evenly over the tokens of the later
  one), ``e2e_request_latency_seconds`` (arrival → finish), ``prompt_tokens_total``,
  ``generation_tokens_total`` (tokens delivered, counted as they arrive), ``prefix_cache_queries_total``
  / ``prefix_cache_hits_total`` (prompt tokens / prompt tokens found cached, as vLLM counts them, from
  the engine's ``Usage``), ``request_success_total{finished_reason}`` (every finished request; a stream
  closed by its client after its first output counts as ``abort``; requests refused before any output
  are not counted).
- ``request_queue_time_seconds``: from a request's arrival at the engine that prefills it to its first
  scheduling (``RequestOutput.queue_s``), observed by the ``Dispatcher``. A disaggregated request's
  prefill-side queue time does not cross the ``KVHandle`` yet, so only requests a worker prefills itself
  are observed.
- At scrape time, from the backend's ``stats()`` (the latest ``WorkerStats``: engines in local mode,
  the ``StatsBoard`` in cluster mode): ``num_requests_running``/``num_requests_waiting`` and
  ``kv_cache_usage_perc`` (used/total blocks, summed over workers, 0–1 as in vLLM);
  ``kv_transfer_bytes_total``/``kv_transfer_failures_total{backend}`` (as the reading workers count
  them: a prefill worker's holder-side counts would count each transfer twice) and
  ``context_cache_hits_total{tier}`` (workers' counters made monotonic here: a worker that restarts or
  leaves never makes a total go down); ``routing_decisions_total{reason}`` (the dispatcher's counts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from workers.engine.types import WorkerStats

PREFIX = "dsaserve:"
# vLLM's buckets (v1 loggers), so quantiles compare across the two.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class RouterMetrics:
    """A router's registry and the metrics in it (see the module docstring).

    Args:
        model_name: the ``model_name`` label of every sample.
        stats: the backend's ``stats()`` (``router.backend.Backend``), called at each scrape; it may
            block (cluster mode asks the ``StatsBoard``), so render off the event loop.
    """

    def __init__(self, model_name: str, stats: Callable[[], dict]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, label, registry=r, buckets=buckets).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, label, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival at the router to the first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between two generated tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival at the router to the last output.", REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival at the engine to first scheduling.", REQUEST_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that got an output.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens delivered.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        r.register(_WorkerCollector(model_name, stats))

    def request(self, arrived: float | None = None) -> RequestMetrics:
        """An observer for one request that arrived at ``arrived`` (``time.monotonic()``; None: now)."""
        return RequestMetrics(self, time.monotonic() if arrived is None else arrived)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's observer: the Frontend calls ``delta`` with each ``Delta`` it yields and ``close``
    when the request's stream ends (whichever way)."""

    def __init__(self, metrics: RouterMetrics, arrived: float) -> None:
        self._m, self._arrived = metrics, arrived
        self._last_token: float | None = None  # when the previous output with tokens arrived
        self._seen = False
        self._done = False

    def delta(self, delta: Any) -> None:
        """Observe a ``router.frontend.Delta`` (its ``token_ids``, ``usage``, ``finished``, ``finish_reason``)."""
        if self._done:
            return
        m, now, n = self._m, time.monotonic(), len(delta.token_ids)
        if not self._seen:  # the engine's usage is known from the first output on
            self._seen = True
            m.prompt_tokens.inc(delta.usage.prompt_tokens)
            m.prefix_queries.inc(delta.usage.prompt_tokens)
            m.prefix_hits.inc(delta.usage.cached_tokens)
        if n:
            m.generation_tokens.inc(n)
            if self._last_token is None:
                m.ttft.observe(now - self._arrived)
            else:
                gap = (now - self._last_token) / n
                for _ in range(n):
                    m.itl.observe(gap)
            self._last_token = now
        if delta.finished:
            self._finish(delta.finish_reason or "abort", now)

    def close(self) -> None:
        """The stream ended; a request with outputs but no finished one was aborted by its caller."""
        if self._seen and not self._done:
            self._finish("abort", time.monotonic())
        self._done = True

    def _finish(self, reason: str, now: float) -> None:
        self._done = True
        self._m.e2e.observe(now - self._arrived)
        self._m.finished(reason)


class _WorkerCollector(Collector):
    """Scrape-time metrics from the backend's ``stats()``; workers' counters kept monotonic."""

    def __init__(self, model_name: str, stats: Callable[[], dict]) -> None:
        self._model, self._stats = model_name, stats
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str], int] = {}  # (worker, counter, label) → last value seen
        self._totals: dict[tuple[str, str], int] = {}  # (counter, label) → router-side total

    def describe(self) -> list:
        return []  # families are built at scrape time; registering must not call stats()

    def _advance(self, worker: str, name: str, label: str, value: int) -> None:
        last = self._last.get((worker, name, label), 0)
        # A smaller value means the worker restarted from zero: all of it is new.
        grew = value - last if value >= last else value
        self._last[(worker, name, label)] = value
        self._totals[(name, label)] = self._totals.get((name, label), 0) + grew

    def collect(self) -> Iterator:
        stats = self._stats()
        workers: list[WorkerStats] = stats.get("workers", [])
        routes: dict[str, int] = stats.get("router", {}).get("routes", {})
        m = [self._model]
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Requests running on workers.", labels=["model_name"])
        running.add_metric(m, sum(w.running for w in workers))
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting on workers.", labels=["model_name"])
        waiting.add_metric(m, sum(w.waiting for w in workers))
        total = sum(w.total_blocks for w in workers)
        used = sum(w.total_blocks - w.free_blocks for w in workers)
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV cache usage (1 = full), over all workers.",
                                  labels=["model_name"])
        usage.add_metric(m, used / total if total else 0.0)
        yield from (running, waiting, usage)

        with self._lock:
            for w in workers:
                kv = w.kv_transfer
                if w.role != "prefill":  # the reader's counts; a holder's mirror them (Ray's endpoint)
                    self._advance(w.worker_id, "bytes", kv.backend, kv.bytes)
                    self._advance(w.worker_id, "failures", kv.backend, kv.failures)
                for tier, hits in w.context_cache_hits.items():
                    self._advance(w.worker_id, "tier", tier, hits)
            totals = dict(self._totals)
        families = {
            "bytes": CounterMetricFamily(PREFIX + "kv_transfer_bytes", "KV bytes transferred between workers.",
                                         labels=["model_name", "backend"]),
            "failures": CounterMetricFamily(PREFIX + "kv_transfer_failures", "Failed KV transfers.",
                                            labels=["model_name", "backend"]),
            "tier": CounterMetricFamily(PREFIX + "context_cache_hits", "Blocks restored from a context cache tier.",
                                        labels=["model_name", "tier"]),
        }
        for (name, label), value in sorted(totals.items()):
            families[name].add_metric([self._model, label], value)
        routing = CounterMetricFamily(PREFIX + "routing_decisions", "Routing decisions by reason.",
                                      labels=["model_name", "reason"])
        for reason, n in sorted(routes.items()):
            routing.add_metric([self._model, reason], n)
        yield from (*families.values(), routing)


def metrics_for(backend: Any) -> RouterMetrics:
    """The ``RouterMetrics`` of ``backend``: its ``metrics`` (a ``Dispatcher``'s), else that of the
    dispatcher it wraps (``LocalBackend.dispatcher``), else one made now and kept on the backend."""
    for owner in (backend, getattr(backend, "dispatcher", None)):
        found = getattr(owner, "metrics", None)
        if isinstance(found, RouterMetrics):
            return found
    made = RouterMetrics(backend.info().model_id, getattr(backend, "stats", dict))
    try:
        backend.metrics = made
    except AttributeError:  # a backend that takes no attributes: its metrics live with this caller
        pass
    return made


def render(backend: Any) -> tuple[bytes, str]:
    """The Prometheus exposition of ``backend``'s metrics and its content type (``GET /metrics``).

    Blocking: it reads the workers' latest stats (cluster mode waits on the ``StatsBoard`` up to a few
    seconds), so call it off the event loop (``await asyncio.to_thread(render, backend)``).
    """
    return metrics_for(backend).render(), CONTENT_TYPE_LATEST


# Every family a scrape exposes (sample names add _total/_bucket/_sum/_count); the dashboard test reads it.
EXPORTED = tuple(PREFIX + n for n in (
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
    "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "request_success",
    "kv_transfer_bytes", "kv_transfer_failures", "routing_decisions", "context_cache_hits",
))
