"""What the gateway adds to one short request: latency through the gateway vs straight to the engine.

    make bench            (or: .venv/bin/python bench/gateway_latency.py [--requests 20])

Sends the same short chat request alternately to the engine and through the gateway (so drift in the
machine's load hits both alike) and prints medians with the ratio to the direct baseline of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from harness import BenchServer, print_table

BODY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}


def timed_ms(client: httpx.Client, url: str, body: dict, headers: dict | None = None) -> float:
    started = time.perf_counter()
    client.post(url, json=body, headers=headers).raise_for_status()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    n = parser.parse_args().requests
    with BenchServer() as server, httpx.Client(timeout=120) as client:
        body = {**BODY, "model": server.settings.served_model_name}
        direct_url, gateway_url = f"{server.engine_url}/v1/chat/completions", f"{server.url}/v1/chat/completions"
        for _ in range(3):  # warm both paths
            timed_ms(client, direct_url, body)
            timed_ms(client, gateway_url, body, server.auth)
        direct, through = [], []
        for _ in range(n):
            direct.append(timed_ms(client, direct_url, body))
            through.append(timed_ms(client, gateway_url, body, server.auth))
    base = statistics.median(direct)
    rows = [[name, f"{statistics.median(s):.1f}", f"{statistics.quantiles(s, n=10)[-1]:.1f}",
             f"{statistics.median(s) / base:.3f}"]
            for name, s in (("straight to the engine", direct), ("through the gateway", through))]
    print_table(f"Short chat request (8 output tokens, base model), {n} requests each",
                ["path", "median ms", "p90 ms", "ratio to direct"], rows)
    print(f"\ngateway overhead (median difference): {statistics.median(through) - base:.1f} ms")


if __name__ == "__main__":
    main()
