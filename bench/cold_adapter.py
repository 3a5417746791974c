"""What an adapter's first request costs: time to first token for an adapter the engine has not loaded yet
(cold), the same adapter's next request (warm), and the base model, one request at a time.

    .venv/bin/python bench/cold_adapter.py [--adapters 10]

One gateway with its embedded engine (the default slots), --adapters fresh rank-8 adapters on q/k/v/o (random
weights) published straight into the registry, so none is loaded anywhere. Then for each adapter in turn: one
base-model request, the adapter's first request (the gateway loads it on the engine, the engine puts it in a slot),
and its second. Each request is streamed, 2 output tokens; TTFT is client-side, send to first content.
The cold request's extra time over the warm one is what one more adapter costs: with many adapters on few slots
(bench/many_adapters.py's 16- and 64-adapter rows) that cost, paid while the engine's step waits, is most of the gap
to the base model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import REPO, BenchServer, make_adapters, print_table

from adapters.basemodel import ensure_default_model
from server.storage.factory import build_registry, build_store


def ttft(url: str, headers: dict[str, str], model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Count to ten."}], "stream": True,
            "max_tokens": 2, "temperature": 0}
    started = time.perf_counter()
    with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as response:
        if response.status_code != 200:
            raise SystemExit(f"{model}: HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if '"content"' in line:
                return time.perf_counter() - started
    raise SystemExit(f"{model}: a stream without content")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10)
    args = parser.parse_args()
    model_dir = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp, BenchServer() as server:
        folders = make_adapters(model_dir, Path(tmp), args.adapters)
        registry = build_registry(server.settings, build_store(server.settings))
        for i, folder in enumerate(folders):
            registry.publish(folder, "bench", f"cold-{i}", origin="bench")
        url, base = f"{server.url}/v1/chat/completions", server.settings.served_model_name
        for _ in range(3):  # the engine's first steps
            ttft(url, server.auth, base)
        times: dict[str, list[float]] = {"base model": [], "adapter, first request (cold)": [],
                                         "adapter, second request (warm)": []}
        for i in range(args.adapters):
            for label, model in zip(times, (base, f"cold-{i}", f"cold-{i}"), strict=True):
                times[label].append(ttft(url, server.auth, model))
    base_p50 = statistics.median(times["base model"])
    rows = [[label, f"{statistics.median(v) * 1000:.0f}", f"{max(v) * 1000:.0f}",
             f"{statistics.median(v) / base_p50:.2f}"] for label, v in times.items()]
    cold, warm = (statistics.median(v) for v in list(times.values())[1:])
    print_table(f"Time to first token, one request at a time, {args.adapters} fresh adapters (ms)",
                ["request", "p50 ms", "max ms", "p50 ratio to base"], rows,
                {"ttft_ms": {k: [round(x * 1000, 1) for x in v] for k, v in times.items()},
                 "cold_extra_ms": round((cold - warm) * 1000, 1)})
    print(f"\nA cold adapter's first request: +{(cold - warm) * 1000:.0f} ms over a warm one (p50)")


if __name__ == "__main__":
    main()
