"""Recent traffic per tenant and adapter, from the gateway's own counters: what the console's traffic page draws.

Every `interval` seconds the history takes a snapshot of the cumulative counters (requests, errors, tokens, the
time-to-first-token histogram) and keeps the last `window` seconds of them; a report is the differences between
consecutive snapshots, the last one taken at the moment of asking. One gateway's view: behind several gateways
Prometheus (`/metrics`) sums them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from server.observability.metrics import Metrics

Series = tuple[str, str]  # (tenant, adapter label)


@dataclass
class Totals:
    requests: float = 0.0
    errors: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    def minus(self, older: Totals | None) -> Totals:
        return self if older is None else self.plus(older, -1.0)

    def plus(self, other: Totals, sign: float = 1.0) -> Totals:
        buckets = dict(self.ttft_buckets)
        for le, n in other.ttft_buckets.items():
            buckets[le] = buckets.get(le, 0.0) + sign * n
        return Totals(self.requests + sign * other.requests, self.errors + sign * other.errors,
                      self.prompt_tokens + sign * other.prompt_tokens,
                      self.completion_tokens + sign * other.completion_tokens, buckets)


def median_from_buckets(buckets: dict[float, float]) -> float | None:
    """The 0.5 quantile of a cumulative histogram, interpolated within its bucket (Prometheus's
    `histogram_quantile`); None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = total / 2, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower  # above the highest finite bound: that bound is all one can say
            inside = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, buckets[le]
    return lower


def snapshot(metrics: Metrics) -> dict[Series, Totals]:
    """The cumulative counters now, by tenant and adapter."""
    totals: dict[Series, Totals] = {}

    def of(labels: dict) -> Totals:
        return totals.setdefault((labels["tenant"], labels["adapter"]), Totals())

    for sample in _samples(metrics.requests):
        of(sample.labels).requests += sample.value
        if not sample.labels["status"].startswith("2"):
            of(sample.labels).errors += sample.value
    for counter, attribute in ((metrics.prompt_tokens, "prompt_tokens"), (metrics.completion_tokens,
                                                                            "completion_tokens")):
        for sample in _samples(counter):
            setattr(of(sample.labels), attribute, getattr(of(sample.labels), attribute) + sample.value)
    for sample in _samples(metrics.ttft, "_bucket"):
        of(sample.labels).ttft_buckets[float(sample.labels["le"])] = sample.value
    return totals


def _samples(metric, suffix: str = "_total"):
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


class TrafficHistory:
    def __init__(self, metrics: Metrics, interval: float = 10.0, window: float = 900.0):
        self.metrics, self.interval, self.window = metrics, interval, window
        self._snapshots: deque[tuple[float, dict[Series, Totals]]] = deque(maxlen=int(window // interval) + 1)

    def sample(self, now: float | None = None) -> None:
        self._snapshots.append((time.time() if now is None else now, snapshot(self.metrics)))

    async def watch(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def report(self, now: float | None = None) -> dict:
        """Per series: totals over the window and one point per interval, oldest first, the last one up to now."""
        taken = [*self._snapshots, (time.time() if now is None else now, snapshot(self.metrics))]
        series: dict[Series, dict] = {}
        for (_, older), (at, newer) in itertools.pairwise(taken):
            for key in taken[-1][1]:  # every series gets every interval (counters never vanish: the last has all)
                step = newer.get(key, Totals()).minus(older.get(key))
                entry = series.setdefault(key, {"sum": Totals(), "points": []})
                entry["sum"] = entry["sum"].plus(step)
                entry["points"].append({"t": int(at), "requests": int(step.requests), "errors": int(step.errors),
                                        "tokens": int(step.prompt_tokens + step.completion_tokens),
                                        "ttft_p50_seconds": median_from_buckets(step.ttft_buckets)})
        data = []
        for (tenant, adapter), entry in sorted(series.items()):
            total: Totals = entry["sum"]
            if total.requests <= 0 and total.prompt_tokens + total.completion_tokens <= 0:
                continue  # seen before the window only
            data.append({"tenant": tenant, "adapter": adapter, "requests": int(total.requests),
                         "errors": int(total.errors), "prompt_tokens": int(total.prompt_tokens),
                         "completion_tokens": int(total.completion_tokens),
                         "ttft_p50_seconds": median_from_buckets(total.ttft_buckets), "points": entry["points"]})
        return {"object": "traffic", "interval_seconds": self.interval, "window_seconds": self.window,
                "series": data}
