"""What the gateway costs on streamed requests, next to LiteLLM's proxy in front of the same engine.

    make bench            (or: .venv/bin/python bench/overhead.py [--tokens 12] [--requests 8 32 128] [--rounds 4])

Targets, all on the same vLLM engine (the gateway's embedded one): the engine itself with the base model
(the baseline), the loraserve gateway, two gateway processes taking the requests in turn (the second one on the
same store and engine, started with LORASERVE_ENGINE_URLS and no worker: what several gateway processes on one
host give), and LiteLLM's proxy (one worker, its default; uvicorn; master
key, no database; provider `hosted_vllm` at the engine's /v1). When the gateway serves base-model
requests through the all-zero LoRA adapter (LORASERVE_BASE_THROUGH_ZERO_ADAPTER=true, not the default),
a fourth target, that adapter's name sent straight to the engine, separates that LoRA work from the relay.
Each request is a streamed chat completion with `stream_options.include_usage`, temperature 0, the same
prompt and exactly N output tokens (`max_tokens` = `min_tokens` = N). At each concurrency (1, 8, 32
streams in flight) every target gets the same number of requests, in four rounds with the target order
reversed every other round, so drift in the machine's load hits all alike (with two rounds, the ratios of
two runs differed by up to 0.06). Measured on the client: output
tokens per second (tokens reported in `usage` / summed wall time of the target's rounds), time to first
token (send to the first SSE chunk with non-empty content; p50 and p99), and both as ratios to the
direct baseline at the same concurrency. Every response must report N tokens in more than one content
chunk, or the run fails (a peer that drops `min_tokens` or buffers the stream cannot look fast); the
prompt alone gets a 3-token answer, checked by one control request without `min_tokens`. The tenant's
concurrency cap is raised to the highest level (the default 16 would refuse half of 32 with 429). The
client (one asyncio httpx client, parsing only the chunks it needs) records its own CPU share; with at
most 128 requests per cell, p99 is near the maximum. Each proxy's own CPU per request (its processes, not the
engine, user + system, by psutil) is the least noisy of these figures: on 2 cores whatever a proxy spends is
taken from the engine's front end and the client.

LiteLLM lives in its own venv (.cache/litellm-venv; `make bench` installs the pinned version), started
as `litellm --config CFG --port P --host 127.0.0.1` while the engine loads, ready at /health/readiness. It
runs with LITELLM_LOCAL_MODEL_COST_MAP=True (no cost-map download), LITELLM_LOG=WARNING (no access log, like
the gateway at `warning`) and LITELLM_TELEMETRY_DISABLED=true; nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from harness import REPO, BenchServer, free_port, print_table

from adapters.zero import ENGINE_NAME as ZERO_ADAPTER

LITELLM_VENV = REPO / ".cache" / "litellm-venv"
LITELLM_KEY = "sk-bench-litellm"
ZERO_TARGET = "engine, zero adapter"
GATEWAY = "loraserve gateway"
TWO_GATEWAYS = "2 gateway processes"
# Alone the model answers in 3 tokens (checked on each run): min_tokens is what makes every answer N long.
PROMPT = "Reply with one word: yes or no. Is fire hot?"


@dataclass
class Target:
    name: str
    urls: list[str]  # chat completions endpoints, taken in turn (several: one per gateway process)
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    processes: list[psutil.Process] = field(default_factory=list)  # a proxy's own: its CPU per request
    _turn: int = 0

    def url(self) -> str:
        self._turn += 1
        return self.urls[self._turn % len(self.urls)]


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)  # seconds
    tokens: int = 0
    wall: float = 0.0
    cpu: float = 0.0  # the client's CPU seconds while this target ran
    proxy_cpu: float = 0.0  # the target's own process (a proxy's; not the engine's) CPU seconds
    requests: int = 0
    min_chunks: int | None = None


def litellm_version() -> str:
    found = re.search(r"^LITELLM_VERSION\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    return found.group(1) if found else "?"


def litellm_binary(venv: Path) -> Path:
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        sys.exit(f"LiteLLM's proxy is not installed ({binary} is missing): `make bench` installs it, or "
                 f"`make .cache/litellm-venv/.installed-{litellm_version()}`.")
    return binary


class LiteLLMProxy:
    """LiteLLM's proxy on a free loopback port in front of the engine at `engine_url`: start, wait_ready, stop."""

    def __init__(self, venv: Path, engine_url: str, model: str):
        self._tmp = tempfile.TemporaryDirectory()
        folder = Path(self._tmp.name)
        config = folder / "litellm.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "model_list": [{"model_name": model, "litellm_params": {
                "model": f"hosted_vllm/{model}", "api_base": f"{engine_url}/v1", "api_key": "dummy"}}],
            "general_settings": {"master_key": LITELLM_KEY},
        }))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "litellm.log"
        self.command = [str(litellm_binary(venv)), "--config", str(config), "--port", str(self.port),
                        "--host", "127.0.0.1"]
        self.process: subprocess.Popen | None = None

    def start(self) -> LiteLLMProxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="WARNING", LITELLM_TELEMETRY_DISABLED="true",
                   LITELLM_DONT_SHOW_FEEDBACK_BOX="true", NO_PROXY="127.0.0.1,localhost",
                   no_proxy="127.0.0.1,localhost")
        self.started = time.monotonic()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, env=env, cwd=self._tmp.name, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        while time.monotonic() < self.started + timeout and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health/readiness", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.fail("LiteLLM's proxy did not become ready")

    def fail(self, why: str) -> None:
        print("LiteLLM's log, last lines:\n" + self.log_tail(), file=sys.stderr)
        sys.exit(why)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._tmp.cleanup()


class Servers(BenchServer):
    """The gateway with its engine (BenchServer), LiteLLM's proxy started while the engine loads, and a second
    gateway process on the same store and engine (no engine or worker of its own)."""

    def __init__(self, litellm_venv: Path, **extra_env: str):
        super().__init__(**extra_env)
        self.litellm_venv = litellm_venv
        self.second: subprocess.Popen | None = None

    def wait_ready(self, timeout: float = 900) -> None:
        self.proxy = LiteLLMProxy(self.litellm_venv, self.engine_url, self.settings.served_model_name).start()
        try:
            super().wait_ready(timeout)
            self.proxy.wait_ready()
            self.second_url = self._start_second_gateway()
        except BaseException:
            self.__exit__()
            raise

    def _start_second_gateway(self) -> str:
        port = free_port()
        env = {**self.env, "LORASERVE_PORT": str(port), "LORASERVE_ENGINE_URLS": self.engine_url,
               "LORASERVE_RUN_WORKER": "false"}
        self.second = subprocess.Popen([sys.executable, "-m", "server.cli", "gateway"], env=env, cwd=REPO,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.second.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit("the second gateway process did not become ready")

    def __exit__(self, *exc) -> None:
        try:
            self.proxy.stop()
            if self.second is not None and self.second.poll() is None:
                self.second.terminate()
                self.second.wait(60)
        finally:
            super().__exit__(*exc)


async def stream_one(client: httpx.AsyncClient, target: Target, tokens: int,
                     fixed: bool = True) -> tuple[float, int, int]:
    """One streamed request: (seconds to the first content, completion tokens from usage, content chunks)."""
    body = {"model": target.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": tokens, "temperature": 0}
    if fixed:
        body["min_tokens"] = tokens
    first, used, chunks = None, None, 0
    started = time.perf_counter()
    async with client.stream("POST", target.url(), json=body, headers=target.headers) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{target.name}: HTTP {response.status_code}: {response.text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            if first is not None and '"content"' not in payload and '"completion_tokens"' not in payload:
                continue  # parse only what can matter: content chunks and usage
            data = json.loads(payload)
            if any((choice.get("delta") or {}).get("content") for choice in data.get("choices") or []):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - started
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
    if first is None or used is None:
        raise RuntimeError(f"{target.name}: a stream without {'content' if first is None else 'usage'}")
    return first, used, chunks


async def run_batch(client: httpx.AsyncClient, target: Target, concurrency: int, requests: int, tokens: int,
                    tally: Tally | None = None) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def one() -> tuple[float, int, int]:
        async with limit:
            return await stream_one(client, target, tokens)

    proxy_cpu = _cpu_seconds(target.processes)
    cpu, started = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(requests)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    proxy_cpu = _cpu_seconds(target.processes) - proxy_cpu
    for _, used, chunks in results:
        if used != tokens:
            raise AssertionError(f"{target.name}: {used} output tokens, not {tokens} (is min_tokens forwarded?)")
        if chunks <= 1:
            raise AssertionError(f"{target.name}: {chunks} content chunk(s): the stream was not streamed")
    if tally is not None:
        tally.ttft += [first for first, _, _ in results]
        tally.tokens += sum(used for _, used, _ in results)
        tally.wall += wall
        tally.cpu += cpu
        tally.proxy_cpu += proxy_cpu
        tally.requests += requests
        least = min(chunks for _, _, chunks in results)
        tally.min_chunks = least if tally.min_chunks is None else min(tally.min_chunks, least)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU of the processes, not their children (the gateway's engine is its child)."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in processes))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


async def measure(targets: list[Target], levels: list[int], counts: list[int], tokens: int,
                  rounds: int) -> tuple[dict[int, dict[str, Tally]], int]:
    limits = httpx.Limits(max_connections=max(levels) * 2, max_keepalive_connections=max(levels) * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # The control: without min_tokens the answer is shorter than N, so the token check below has teeth.
        _, natural, _ = await stream_one(client, targets[0], tokens, fixed=False)
        if natural >= tokens:
            print(f"warning: without min_tokens the answer already has {natural} tokens; the check that "
                  f"each target honours min_tokens proves nothing at N={tokens}", file=sys.stderr)
        warm = min(tokens, 4)
        await run_batch(client, targets[0], max(levels), max(levels), warm)  # the engine's batch shapes
        for target in targets:  # each path's connections, imports, caches
            await run_batch(client, target, 4, 8, warm)
        # The gateway serves the base model through an all-zero adapter (adapters/zero.py): the engine does
        # LoRA work for it that a direct base-model request skips. The same request straight to the engine
        # separates that from what the relay costs.
        models = (await client.get(targets[0].urls[0].replace("/chat/completions", "/models"))).json()["data"]
        if any(m["id"] == ZERO_ADAPTER for m in models):
            targets.insert(1, Target(ZERO_TARGET, targets[0].urls, ZERO_ADAPTER))
            await run_batch(client, targets[1], 4, 8, warm)
        results: dict[int, dict[str, Tally]] = {}
        for concurrency, count in zip(levels, counts, strict=True):
            tallies = {target.name: Tally() for target in targets}
            for r in range(rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                share = count // rounds + (1 if r < count % rounds else 0)
                for target in order:
                    await run_batch(client, target, concurrency, share, tokens, tallies[target.name])
            results[concurrency] = tallies
            direct = tallies[targets[0].name]
            print(f"  c={concurrency}: " + ", ".join(
                f"{name} {t.tokens / t.wall:.0f} tok/s (x{t.tokens / t.wall / (direct.tokens / direct.wall):.2f})"
                for name, t in tallies.items()), flush=True)
    return results, natural


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12, help="output tokens per request (N)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[8, 32, 128],
                        help="requests per target at each concurrency (one number, or one per level)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per level; the target order alternates")
    parser.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV, help="the venv with litellm[proxy]")
    args = parser.parse_args()
    levels = args.concurrency
    counts = args.requests * len(levels) if len(args.requests) == 1 else args.requests
    if len(counts) != len(levels) or min(counts) < args.rounds:
        parser.error("--requests: one count, or one per concurrency, each at least --rounds")
    litellm_binary(args.litellm_venv)  # before minutes of engine start-up: say how to install it if it is missing
    started = time.monotonic()
    with Servers(args.litellm_venv, LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS=str(max(levels))) as server:
        model, proxy = server.settings.served_model_name, server.proxy
        gateway = psutil.Process(server.process.pid)
        print(f"gateway, engine and LiteLLM {litellm_version()} (started alongside) ready in "
              f"{server.start_seconds:.0f} s; LiteLLM: {' '.join(proxy.command)}", flush=True)
        targets = [
            Target("engine (direct)", [f"{server.engine_url}/v1/chat/completions"], model),
            Target(GATEWAY, [f"{server.url}/v1/chat/completions"], model, server.auth, [gateway]),
            Target(TWO_GATEWAYS, [f"{url}/v1/chat/completions" for url in (server.url, server.second_url)], model,
                   server.auth, [gateway, psutil.Process(server.second.pid)]),
            Target("LiteLLM proxy", [f"{proxy.url}/v1/chat/completions"], model,
                   {"Authorization": f"Bearer {LITELLM_KEY}"}, [psutil.Process(proxy.process.pid)]),
        ]
        try:
            results, natural = asyncio.run(measure(targets, levels, counts, args.tokens, args.rounds))
        except (RuntimeError, AssertionError, httpx.HTTPError) as error:
            proxy.fail(f"measurement failed: {error!r}")
        outbound = [line for line in proxy.log.read_text(errors="replace").splitlines()
                    if re.search(r"ConnectError|Name or service not known|raw\.githubusercontent", line)]
        if outbound:
            print("LiteLLM's log mentions outbound attempts:\n" + "\n".join(outbound[:5]), file=sys.stderr)
    rows, data = [], {"tokens": args.tokens, "rounds": args.rounds, "litellm_version": litellm_version(),
                      "prompt": PROMPT, "tokens_without_min_tokens": natural, "levels": {}}
    for concurrency, count in zip(levels, counts, strict=True):
        tallies = results[concurrency]
        direct = tallies[targets[0].name]
        base_rate, base_p50 = direct.tokens / direct.wall, statistics.median(direct.ttft)
        level = data["levels"][str(concurrency)] = {"requests_per_target": count, "targets": {}}
        for name, t in tallies.items():
            rate, p50 = t.tokens / t.wall, statistics.median(t.ttft)
            proxy_ms = t.proxy_cpu * 1000 / t.requests if t.proxy_cpu else None
            rows.append([str(concurrency), name, f"{rate:.0f}", f"{p50 * 1000:.0f}", f"{p99(t.ttft) * 1000:.0f}",
                         f"{rate / base_rate:.2f}", f"{p50 / base_p50:.2f}",
                         "-" if proxy_ms is None else f"{proxy_ms:.1f}"])
            level["targets"][name] = {
                "output_tokens": t.tokens, "wall_s": round(t.wall, 4), "tokens_per_s": round(rate, 2),
                "ttft_p50_ms": round(p50 * 1000, 2), "ttft_p99_ms": round(p99(t.ttft) * 1000, 2),
                "ttft_ms": [round(x * 1000, 2) for x in t.ttft], "tokens_per_s_ratio": round(rate / base_rate, 4),
                "ttft_p50_ratio": round(p50 / base_p50, 4), "min_content_chunks": t.min_chunks,
                "client_cpu_share": round(t.cpu / t.wall, 3),
                "proxy_cpu_ms_per_request": None if proxy_ms is None else round(proxy_ms, 3)}
        if ZERO_TARGET in tallies:  # the relay alone: the gateway against the same engine work
            zero, gateway = tallies[ZERO_TARGET], tallies[GATEWAY]
            level["gateway_vs_zero_adapter"] = {
                "tokens_per_s_ratio": round(gateway.tokens / gateway.wall / (zero.tokens / zero.wall), 4),
                "ttft_p50_added_ms": round((statistics.median(gateway.ttft) - statistics.median(zero.ttft)) * 1000, 2)}
    data["wall_s"] = round(time.monotonic() - started, 1)
    print_table(f"Streamed chat requests ({args.tokens} output tokens each, base model), per target at each "
                f"concurrency; requests per target: {', '.join(map(str, counts))}",
                ["concurrent", "target", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "tok/s ratio to direct",
                 "TTFT p50 ratio to direct", "proxy CPU ms per request"], rows, data)
    likes = {c: lv["gateway_vs_zero_adapter"] for c, lv in data["levels"].items() if "gateway_vs_zero_adapter" in lv}
    if likes:
        print("\nThe gateway against the engine doing the same work (the base model through the zero adapter):")
    for concurrency, like in likes.items():
        print(f"  c={concurrency}: tok/s x{like['tokens_per_s_ratio']:.2f}, "
              f"TTFT p50 {like['ttft_p50_added_ms']:+.0f} ms")
    busiest = max(t["client_cpu_share"] for lv in data["levels"].values() for t in lv["targets"].values())
    print(f"\nclient CPU share at most {busiest:.0%} of one core; whole run {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
