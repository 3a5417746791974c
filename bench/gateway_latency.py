"""What the gateway adds to one short request: median latency through the gateway vs straight to the engine.

    make bench            (or: .venv/bin/python bench/gateway_latency.py [--requests 20])

Starts `loraserve gateway` (with its embedded vLLM engine) on free loopback ports over a temporary data
folder, makes a tenant, then sends the same short chat request alternately to the engine and through the
gateway, and prints a table with the ratio to the direct baseline of the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.basemodel import ensure_default_model  # noqa: E402
from server.config import Settings  # noqa: E402
from server.services import build_store  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_post(client: httpx.Client, url: str, body: dict, headers: dict | None = None) -> float:
    started = time.perf_counter()
    response = client.post(url, json=body, headers=headers)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    model = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as data:
        port, engine_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
        env.update(LORASERVE_DATA_DIR=data, LORASERVE_PORT=str(port), LORASERVE_ENGINE_PORT=str(engine_port),
                   LORASERVE_BASE_MODEL_PATH=str(model), LORASERVE_LOG_LEVEL="warning")
        settings = Settings(_env_file=None, data_dir=Path(data), base_model_path=model)
        store = build_store(settings)
        store.create_tenant("bench")
        _, key = store.create_key("bench")
        server = subprocess.Popen([sys.executable, "-m", "server.cli", "gateway"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run(port, engine_port, key, settings.served_model_name, args.requests)
        finally:
            server.terminate()
            server.wait(60)


def run(port: int, engine_port: int, key: str, served: str, n: int) -> None:
    gateway, engine = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{engine_port}"
    with httpx.Client(timeout=120) as client:
        deadline = time.monotonic() + 900
        while True:
            try:
                if client.get(f"{gateway}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the gateway did not become ready")
            time.sleep(1)
        auth = {"Authorization": f"Bearer {key}"}
        for _ in range(3):  # warm both paths
            timed_post(client, f"{engine}/v1/chat/completions", {**BODY, "model": served})
            timed_post(client, f"{gateway}/v1/chat/completions", {**BODY, "model": served}, auth)
        direct, through = [], []
        for _ in range(n):  # alternate, so drift in the machine's load hits both alike
            direct.append(timed_post(client, f"{engine}/v1/chat/completions", {**BODY, "model": served}))
            through.append(timed_post(client, f"{gateway}/v1/chat/completions", {**BODY, "model": served}, auth))
    base = statistics.median(direct)
    print(f"\nShort chat request (8 output tokens, base model), {n} requests each, median and p90 in ms\n")
    print("| path | median ms | p90 ms | ratio to direct |")
    print("| --- | ---: | ---: | ---: |")
    for name, samples in (("straight to the engine", direct), ("through the gateway", through)):
        p90 = statistics.quantiles(samples, n=10)[-1]
        print(f"| {name} | {statistics.median(samples):.1f} | {p90:.1f} | {statistics.median(samples) / base:.3f} |")
    print(f"\ngateway overhead (median difference): {statistics.median(through) - base:.1f} ms")


if __name__ == "__main__":
    main()
