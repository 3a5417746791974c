"""Prometheus metrics of the gateway. The only module that imports `prometheus_client`.

Label values come only from what the gateway itself knows: an authenticated tenant, an adapter that
resolved inside it (or `base`, or `unknown` when the name did not resolve), a route template, a status
code, a fixed reason. A client cannot make new series by sending odd names, so the number of series is
bounded by the tenants and adapters an operator configured.

State that lives elsewhere (the registry's size, jobs by status, what each engine holds) is read when
Prometheus scrapes, by a collector, rather than kept in step by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_OVERHEAD = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self, state: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        per_adapter = ["tenant", "adapter"]
        self.requests = Counter("loraserve_requests", "Requests to the OpenAI routes.",
                                [*per_adapter, "route", "status"], registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed.", per_adapter, registry=r)
        self.completion_tokens = Counter("loraserve_completion_tokens", "Completion tokens generated.", per_adapter,
                                         registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "From request arrival to the first token.",
                              per_adapter, buckets=_LATENCY, registry=r)
        self.duration = Histogram("loraserve_request_duration_seconds", "From request arrival to the last byte.",
                                  per_adapter, buckets=_LATENCY, registry=r)
        self.overhead = Histogram("loraserve_gateway_overhead_seconds",
                                  "Time in the gateway before the engine got the request (adapter loads excluded).",
                                  per_adapter, buckets=_OVERHEAD, registry=r)
        self.version_requests = Counter(
            "loraserve_version_requests", "Answers (result `ok`) and server errors (`error`) of each adapter version.",
            [*per_adapter, "version", "result"], registry=r)
        self.cold_starts = Counter("loraserve_cold_start_requests", "Requests that waited for an adapter load.",
                                   per_adapter, registry=r)
        self.rejections = Counter("loraserve_rejections", "Requests refused, by reason.", ["reason"], registry=r)
        self.adapter_loads = Counter("loraserve_adapter_loads", "Adapter loads on an engine.", ["engine"], registry=r)
        self.adapter_unloads = Counter("loraserve_adapter_unloads", "Adapter unloads from an engine.", ["engine"],
                                       registry=r)
        self.adapter_load_seconds = Histogram("loraserve_adapter_load_seconds", "Time to load an adapter.",
                                              ["engine"], buckets=_LATENCY, registry=r)
        self.uploads = Counter("loraserve_uploads", "Adapter uploads, accepted or refused (with the reason).",
                               ["result", "reason"], registry=r)
        self.engine_restarts = Counter("loraserve_engine_restarts", "Restarts of the embedded engine.", registry=r)
        self._limits_store: tuple[Gauge, Counter] | None = None  # made when a shared store is first heard of
        if state is not None:
            r.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def limits_store(self, up: bool) -> None:
        """The shared limits store answered (`up`) or failed; a gateway without one has neither series."""
        if self._limits_store is None:
            self._limits_store = (
                Gauge("loraserve_limits_store_up", "1 while the shared limits store (Redis) answers; 0: this "
                      "gateway counts tenant limits on its own.", registry=self.registry),
                Counter("loraserve_limits_store_errors", "Calls to the shared limits store that failed.",
                        registry=self.registry))
        gauge, errors = self._limits_store
        gauge.set(1 if up else 0)
        if not up:
            errors.inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def upload(self, accepted: bool, reason: str = "") -> None:
        self.uploads.labels("accepted" if accepted else "refused", reason).inc()

    def adapter_loaded(self, engine: str, seconds: float) -> None:
        self.adapter_loads.labels(engine).inc()
        self.adapter_load_seconds.labels(engine).observe(seconds)

    def adapter_unloaded(self, engine: str) -> None:
        self.adapter_unloads.labels(engine).inc()


class RequestRecorder:
    """One OpenAI request's figures, fed by the handler and the relay as it goes."""

    def __init__(self, metrics: Metrics, started: float, tenant: str, route: str):
        self.metrics, self.started, self.tenant, self.route = metrics, started, tenant, route
        self.adapter = "unknown"
        self.prompt_tokens = self.completion_tokens = 0
        self.prompt_estimate = 0  # charged when a client leaves before the engine reported any usage
        self.status: int | None = None
        self.version: int | None = None  # the adapter version that served it
        self._usage_seen = False
        self._first = False
        self._sent = False
        self._done = False
        # Gets the tokens used, or None when unknown (a client left before a whole answer it never saw).
        self.on_finish: Callable[[int | None], None] = lambda tokens: None
        self.on_status: Callable[[int], None] = lambda status: None  # gets the final status

    def engine_sent(self, load_seconds: float) -> None:
        """Called once per engine tried; the gateway's overhead counts up to the first try."""
        if load_seconds:
            self.metrics.cold_starts.labels(self.tenant, self.adapter).inc()
        if not self._sent:
            self._sent = True
            overhead = time.perf_counter() - self.started - load_seconds
            self.metrics.overhead.labels(self.tenant, self.adapter).observe(max(0.0, overhead))

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            self.metrics.ttft.labels(self.tenant, self.adapter).observe(time.perf_counter() - self.started)

    def usage(self, usage: dict) -> None:
        """The engine's `usage` so far (cumulative: streams report it on every chunk)."""
        self._usage_seen = True  # chat and completions name them prompt/completion, responses input/output
        self.prompt_tokens = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
        self.completion_tokens = usage.get("completion_tokens") or usage.get("output_tokens") or 0

    def finished(self, status: int, *, usage_unknown: bool = False) -> None:
        """The request is over: count it once, and charge the tokens used. `usage_unknown`: the engine
        request was abandoned before it reported usage (a non-streamed request whose client left)."""
        if self._done:
            return
        self._done = True
        self.status = status
        if self._usage_seen:
            used: int | None = self.prompt_tokens + self.completion_tokens
        elif usage_unknown:
            used = None
        else:
            used = self.prompt_estimate if status == 499 else 0
        self.on_finish(used)
        self.metrics.prompt_tokens.labels(self.tenant, self.adapter).inc(self.prompt_tokens)
        self.metrics.completion_tokens.labels(self.tenant, self.adapter).inc(self.completion_tokens)
        if status == 200:
            self.first_token()  # a non-streamed answer's first token arrives with its last
        self.metrics.requests.labels(self.tenant, self.adapter, self.route, str(status)).inc()
        if self.version is not None and (status == 200 or status >= 500):
            self.metrics.version_requests.labels(self.tenant, self.adapter, str(self.version),
                                                 "ok" if status == 200 else "error").inc()
        self.on_status(status)
        self.metrics.duration.labels(self.tenant, self.adapter).observe(time.perf_counter() - self.started)


class _StateCollector(Collector):
    """Gauges read at scrape time from a dict the services build (see `Services.metrics_state`)."""

    def __init__(self, state: Callable[[], dict]):
        self.state = state

    def collect(self) -> Iterable:
        s = self.state()
        yield _gauge("loraserve_engine_up", "1 when the engine answers its health check.", ["engine"],
                     s["engine_up"])
        yield _gauge("loraserve_adapters_resident", "Adapter versions loaded on each engine.", ["engine"],
                     s["resident"])
        yield _gauge("loraserve_registry_adapters", "Adapters in the registry.", ["tenant"], s["adapters"])
        yield _gauge("loraserve_registry_versions", "Adapter versions in the registry.", ["tenant"], s["versions"])
        yield _gauge("loraserve_registry_bytes", "Bytes of adapter weights in the registry.", ["tenant"], s["bytes"])
        yield _gauge("loraserve_fine_tuning_jobs", "Fine-tuning jobs by status.", ["status"], s["jobs"])
        yield _gauge("loraserve_adapter_evaluation", "An adapter version's evaluation (its active version and "
                     "newest evaluated one): loss, exact_match or similarity of `model` (adapter, replaces, base, "
                     "few_shot) on the golden or general `set`.",
                     ["tenant", "adapter", "version", "set", "model", "metric"], s["evaluations"])
        tokens = CounterMetricFamily("loraserve_training_tokens", "Tokens trained on by succeeded jobs.")
        tokens.add_metric([], s["training_tokens"])
        yield tokens
        seconds = SummaryMetricFamily("loraserve_fine_tuning_job_duration_seconds",
                                      "Wall time of finished fine-tuning jobs.")
        seconds.add_metric([], count_value=s["job_count"], sum_value=s["job_seconds"])
        yield seconds


def _gauge(name: str, doc: str, labels: list[str], values: dict) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        gauge.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return gauge
