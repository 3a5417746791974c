"""Correctness under batching: do adapters served together answer as each does alone?

    .venv/bin/python bench/batching.py [--adapters 10] [--prompts 2] [--tokens 32]

Ten rank-8 adapters (random, strong weights, so each answers differently) and the base model are asked
each prompt one request at a time, then all requests at once (one batch: --max-loras is raised to hold
every adapter, and no more), at temperature 0 through the gateway. An answer that differs from its
solo answer is reported with the token where it begins. This runs three times: as deployed (base-model
requests reach the engine as plain base-model rows, and this package's vLLM plugin keeps adapters off them), with
LORASERVE_BASE_THROUGH_ZERO_ADAPTER=true (base requests go through an all-zero adapter instead), and as
plain rows with the plugin disabled (VLLM_PLUGINS), where vLLM's CPU ops apply the last slot's adapter.
The throughput of the batch is compared with the same requests one at a time (the baseline).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import REPO, BenchServer, ensure_default_model, make_adapters, print_table
from hot_load import upload

PROMPTS = ["Write one sentence about the sea.", "Name three colours.", "What do bees make?", "Describe a city."]


def ask(server: BenchServer, model: str, prompt: str, tokens: int, barrier: threading.Barrier | None = None):
    if barrier is not None:
        barrier.wait(timeout=120)
    reply = httpx.post(f"{server.url}/v1/chat/completions", headers=server.auth, timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
        "temperature": 0, "logprobs": True})
    reply.raise_for_status()
    return [t["token"] for t in reply.json()["choices"][0]["logprobs"]["content"]]


def first_difference(a: list[str], b: list[str]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(folders: list[Path], args, zero_adapter: bool = False, plugin: bool = True) -> dict:
    # Every slot in use in each mode: the adapters, plus the zero adapter when base requests go through it.
    requests = (len(folders) + 1) * args.prompts
    env = {"LORASERVE_ENGINE_MAX_LORAS": str(len(folders) + zero_adapter),
           "LORASERVE_BASE_THROUGH_ZERO_ADAPTER": str(zero_adapter).lower(),
           "LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS": str(requests)}  # all at once, none refused
    if not plugin:
        env["VLLM_PLUGINS"] = "none"  # an allowlist naming no installed plugin
    with BenchServer(**env) as server, httpx.Client(timeout=600) as client:
        for i, folder in enumerate(folders):
            upload(client, server, f"a{i}", folder)
        base = server.settings.served_model_name
        models = [*(f"a{i}" for i in range(len(folders))), base]
        calls = [(model, prompt) for prompt in PROMPTS[:args.prompts] for model in models]
        started = time.perf_counter()
        alone = [ask(server, m, p, args.tokens) for m, p in calls]
        alone_s = time.perf_counter() - started
        barrier = threading.Barrier(len(calls))
        started = time.perf_counter()
        with ThreadPoolExecutor(len(calls)) as pool:
            together = list(pool.map(lambda c: ask(server, c[0], c[1], args.tokens, barrier), calls))
        together_s = time.perf_counter() - started
    result = {"alone_s": alone_s, "together_s": together_s, "tokens": sum(map(len, together)), "groups": {}}
    for (model, prompt), solo, batched in zip(calls, alone, together, strict=True):
        group = result["groups"].setdefault("base model" if model == base else "adapters", [])
        at = first_difference(solo, batched)
        group.append({"model": model, "prompt": prompt, "diverges_at": at,
                      "alone": "".join(solo), "together": "".join(batched)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
        folders = make_adapters(model, Path(tmp), args.adapters, std=0.3)
        results = {"plain rows, vLLM plugin (default)": run(folders, args),
                   "through the zero adapter": run(folders, args, zero_adapter=True),
                   "plain rows, plugin disabled": run(folders, args, plugin=False)}
    rows = []
    for mode, result in results.items():
        speedup = result["alone_s"] / result["together_s"]
        for group, answers in result["groups"].items():
            diverged = [a for a in answers if a["diverges_at"] is not None]
            where = ", ".join(f"{a['model']} at token {a['diverges_at']}" for a in diverged[:3]) or "none"
            rows.append([mode, group, f"{len(answers) - len(diverged)}/{len(answers)}", where,
                         f"{result['tokens'] / result['together_s']:.1f}", f"{speedup:.2f}"])
        for answers in result["groups"].values():
            for a in answers:
                if a["diverges_at"] is not None:
                    print(f"  {mode}: {a['model']} on {a['prompt']!r} diverges at token {a['diverges_at']}:\n"
                          f"    alone:    {a['alone']!r}\n    together: {a['together']!r}")
    print_table(f"Correctness under batching: {args.adapters} adapters + the base model, {args.prompts} prompts, "
                f"{args.tokens} tokens, temperature 0; all requests at once vs one at a time",
                ["base-model requests", "answers", "identical to alone", "first divergence",
                 "batch output tokens/s", "speed-up over one at a time"], rows, data=results)


if __name__ == "__main__":
    main()
