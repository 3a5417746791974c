"""Adapter-affinity routing against round robin: two engines, the same traffic, the same run.

    .venv/bin/python bench/routing.py [--adapters 8] [--requests 64] [--concurrency 8]

Two real vLLM CPU engines (`loraserve engine`, --max-loras 2 each) serve one gateway at a time: first with
LORASERVE_ENGINE_ROUTING=round_robin (the baseline), then with `affinity`. Each mode gets its own tenant
and adapters (so neither finds the other's loaded), the same number of requests spread uniformly over
them, and the same concurrency. Adapter loads come from the gateway's own counter.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import ADMIN_KEY, REPO, free_port, make_adapters, print_table

from adapters.basemodel import ensure_default_model
from server.config import Settings
from server.storage.factory import build_registry, build_store

MAX_TOKENS = 16


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "server.cli", *args], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ok(url: str, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            sys.exit(f"{url}: the process exited")
        time.sleep(0.5)
    sys.exit(f"{url} did not become ready")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(60)


def run_mode(mode: str, env: dict[str, str], data: Path, key: str, models: list[str], args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = spawn(["gateway"], {**env, "LORASERVE_PORT": str(port), "LORASERVE_ENGINE_ROUTING": mode},
                    data / f"gateway-{mode}.log")
    try:
        wait_ok(f"{url}/readyz", gateway)
        order = random.Random(7).choices(models, k=args.requests)  # the same sequence in both modes

        def one(model: str) -> tuple[float, int]:
            started = time.perf_counter()
            reply = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=600,
                               json={"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
                                     "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0})
            reply.raise_for_status()
            return time.perf_counter() - started, reply.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, order))
        wall = time.perf_counter() - started
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
        loads = sum(float(v) for v in re.findall(r"^loraserve_adapter_loads_total\{[^}]*\} (\S+)$", metrics, re.M))
        return {"tokens_per_s": sum(t for _, t in results) / wall, "loads": loads, "wall_s": wall,
                "p50_ms": statistics.median(s for s, _ in results) * 1000}
    finally:
        stop(gateway)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    model = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        base = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
        base.update(LORASERVE_DATA_DIR=str(data), LORASERVE_BASE_MODEL_PATH=str(model), LORASERVE_ADMIN_KEY=ADMIN_KEY,
                    LORASERVE_LOG_LEVEL="warning", LORASERVE_ENGINE_MEMORY_UTILIZATION="0.15",
                    LORASERVE_ENGINE_MAX_LORAS="2")
        ports = [free_port(), free_port()]
        engines = [spawn(["engine"], {**base, "LORASERVE_ENGINE_PORT": str(p)}, data / f"engine-{p}.log")
                   for p in ports]
        try:
            settings = Settings(_env_file=None, data_dir=data, base_model_path=model)
            store = build_store(settings)
            registry = build_registry(settings, store)
            registry.root.mkdir(parents=True, exist_ok=True)
            folders = make_adapters(model, data / "made", args.adapters)
            keys, models = {}, [f"a{i}" for i in range(args.adapters)]
            for mode in ("round_robin", "affinity"):
                tenant = mode.replace("_", "-")
                store.create_tenant(tenant)
                keys[mode] = store.create_key(tenant)[1]
                for name, folder in zip(models, folders, strict=True):
                    registry.publish(folder, tenant, name, origin="bench")
            for port, engine in zip(ports, engines, strict=True):
                wait_ok(f"http://127.0.0.1:{port}/health", engine)
            env = {**base, "LORASERVE_ENGINE_URLS": ",".join(f"http://127.0.0.1:{p}" for p in ports)}
            results = {mode: run_mode(mode, env, data, keys[mode], models, args) for mode in keys}
        finally:
            for engine in engines:
                stop(engine)
    baseline = results["round_robin"]
    rows = [[mode, f"{r['loads']:.0f}", f"{r['tokens_per_s']:.1f}",
             f"{r['tokens_per_s'] / baseline['tokens_per_s']:.2f}", f"{r['p50_ms']:.0f}", f"{r['wall_s']:.1f}"]
            for mode, r in results.items()]
    print_table(f"Routing over 2 engines (--max-loras 2 each): {args.requests} requests of {MAX_TOKENS} tokens, "
                f"{args.adapters} adapters, {args.concurrency} concurrent",
                ["routing", "adapter loads", "output tokens/s", "ratio to round robin", "p50 ms", "wall s"], rows)


if __name__ == "__main__":
    main()
