"""vLLM's own load generator (`vllm bench serve`), not this project's harness: adapter traffic against the base model,
through the gateway and straight to the engine, in one run.

    .venv/bin/python bench/vllm_serve.py [--prompts 32] [--input-len 128] [--output-len 32] [--vllm-lora-ops]

One gateway with its embedded engine (--max-loras 4, prefix caching off so every row does the same work), four
rank-8 adapters (random weights) published to the tenant `bench` and loaded by one request each before timing.
Rows: the base model and the four adapters (`--lora-modules`: vLLM's client picks one per request), each through
the gateway (the tenant's names) and direct to the engine (the engine-side names the gateway loaded them under).
Random prompts of --input-len tokens, --output-len tokens each (`--ignore-eos`), all --prompts at once
(prefill-heavy, like the issue's measurement). Ratios: adapters to base on the same path, and gateway to direct.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from harness import REPO, BenchServer, make_adapters, print_table

from server.storage.factory import build_registry, build_store

ADAPTERS = 4


def bench_serve(url: str, key: str, model: str, tokenizer: Path, lora: list[str], args, out: Path) -> dict:
    """One `vllm bench serve` run (as `loraserve vllm`, see server/engine/vllm_cli.py); its result JSON."""
    command = [sys.executable, "-m", "server.cli", "vllm", "bench", "serve", "--backend", "openai-chat",
               "--endpoint", "/v1/chat/completions", "--base-url", url, "--model", model, "--tokenizer",
               str(tokenizer), "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(args.prompts), "--ignore-eos",
               "--seed", "1", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    if lora:
        command += ["--lora-modules", *lora]
    env = dict(os.environ, OPENAI_API_KEY=key, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        sys.exit(f"vllm bench serve failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--vllm-lora-ops", action="store_true",
                        help="vLLM's own CPU LoRA ops (LORASERVE_ENGINE_GROUPED_LORA_OPS=false): the before")
    args = parser.parse_args()
    env = {"LORASERVE_ENGINE_MAX_LORAS": str(ADAPTERS), "LORASERVE_ENGINE_EXTRA_ARGS": "--no-enable-prefix-caching",
           "LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS": str(args.prompts),  # all at once, none refused
           "LORASERVE_ENGINE_GROUPED_LORA_OPS": str(not args.vllm_lora_ops).lower()}
    with tempfile.TemporaryDirectory() as tmp, BenchServer(**env) as server:
        folders = make_adapters(server.model, Path(tmp), ADAPTERS)
        store = build_store(server.settings)
        registry = build_registry(server.settings, store)
        names = [f"a{i}" for i in range(ADAPTERS)]
        for name, folder in zip(names, folders, strict=True):
            registry.publish(folder, "bench", name, origin="bench")
            httpx.post(f"{server.url}/v1/chat/completions", headers=server.auth, timeout=600, json={
                "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).raise_for_status()
        base = server.settings.served_model_name
        engine_names = sorted(m["id"] for m in httpx.get(f"{server.engine_url}/v1/models", timeout=30).json()["data"]
                              if m["id"] != base)
        rows = {}
        for path, url, lora in (("gateway", server.url, names), ("direct", server.engine_url, engine_names)):
            for kind in ("base", "adapters"):
                result = bench_serve(url, server.key, base, server.model, lora if kind == "adapters" else [], args,
                                     Path(tmp) / f"{path}-{kind}.json")
                if result.get("failed"):
                    sys.exit(f"{path} {kind}: {result['failed']} requests failed")
                rows[path, kind] = result
                print(f"{path} {kind}: {result['output_throughput']:.1f} tok/s", flush=True)

    def line(path: str, kind: str) -> list[str]:
        r, same_path_base, direct = rows[path, kind], rows[path, "base"], rows["direct", kind]
        return [f"{kind} ({path})", f"{r['output_throughput']:.1f}",
                f"{r['output_throughput'] / same_path_base['output_throughput']:.2f}",
                f"{r['output_throughput'] / direct['output_throughput']:.2f}", f"{r['median_ttft_ms']:.0f}",
                f"{r['median_ttft_ms'] / same_path_base['median_ttft_ms']:.2f}",
                f"{r['median_ttft_ms'] / direct['median_ttft_ms']:.2f}", f"{r['p99_ttft_ms']:.0f}"]

    print_table(f"vLLM's `vllm bench serve`: {args.prompts} random prompts of {args.input_len} tokens, "
                f"{args.output_len} output tokens, all at once; {ADAPTERS} adapters in {ADAPTERS} slots, "
                f"prefix caching off; {'vLLM' if args.vllm_lora_ops else 'grouped'} CPU LoRA ops",
                ["traffic", "output tok/s", "ratio to base", "ratio to direct", "TTFT p50 ms", "TTFT ratio to base",
                 "TTFT ratio to direct", "TTFT p99 ms"],
                [line(path, kind) for path in ("direct", "gateway") for kind in ("base", "adapters")],
                {f"{p}-{k}": {m: r.get(m) for m in ("output_throughput", "median_ttft_ms", "p99_ttft_ms",
                                                     "median_tpot_ms", "completed")} for (p, k), r in rows.items()})


if __name__ == "__main__":
    main()
