"""The gateway's own added time per request, read from its own histogram, at 1 and 16 concurrent streams.

    .venv/bin/python bench/metrics_overhead.py [--requests 64]

`loraserve_gateway_overhead_seconds` is the time from a request's arrival to the engine receiving it
(authentication, model resolution, metrics; adapter loads excluded). The baseline is one stream at a
time in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import re

import httpx
from harness import BenchServer, print_table

BODY = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 16, "stream": True}


async def stream_one(client: httpx.AsyncClient, server: BenchServer, model: str) -> None:
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json={**BODY, "model": model},
                             headers=server.auth) as response:
        response.raise_for_status()
        async for _ in response.aiter_bytes():
            pass


async def run_at(server: BenchServer, concurrency: int, requests: int, model: str) -> None:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one():
            async with limit:
                await stream_one(client, server, model)
        await asyncio.gather(*(one() for _ in range(requests)))


def overhead(server: BenchServer) -> tuple[float, float, dict[float, float]]:
    text = httpx.get(f"{server.url}/metrics", headers=server.admin_auth).text
    pick = lambda suffix: [  # noqa: E731
        (m.group(1), float(m.group(2))) for m in re.finditer(
            rf'^loraserve_gateway_overhead_seconds_{suffix}{{([^}}]*)}} (\S+)$', text, re.M)]
    count = sum(v for _, v in pick("count"))
    total = sum(v for _, v in pick("sum"))
    buckets: dict[float, float] = {}
    for labels, value in pick("bucket"):
        le = float(re.search(r'le="([^"]+)"', labels).group(1).replace("+Inf", "inf"))
        buckets[le] = buckets.get(le, 0) + value
    return count, total, buckets


def quantile(buckets: dict[float, float], count: float, q: float) -> float:
    for le in sorted(buckets):
        if buckets[le] >= q * count:
            return le
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    n = parser.parse_args().requests
    rows, base = [], None
    with BenchServer() as server:
        model = server.settings.served_model_name
        asyncio.run(run_at(server, 4, 8, model))  # warm up
        for concurrency in (1, 16):
            c0, s0, b0 = overhead(server)
            asyncio.run(run_at(server, concurrency, n, model))
            c1, s1, b1 = overhead(server)
            count, mean = c1 - c0, (s1 - s0) / (c1 - c0)
            delta = {le: b1[le] - b0.get(le, 0) for le in b1}
            base = base or mean
            rows.append([f"{concurrency} concurrent streams", str(int(count)), f"{mean * 1000:.2f}",
                         f"<= {quantile(delta, count, 0.5) * 1000:g}", f"<= {quantile(delta, count, 0.99) * 1000:g}",
                         f"{mean / base:.2f}"])
    print_table(f"Gateway overhead per request (its own histogram), {n} streamed requests of 16 tokens",
                ["load", "requests", "mean ms", "p50 ms (bucket)", "p99 ms (bucket)", "ratio to 1 stream"], rows)


if __name__ == "__main__":
    main()
