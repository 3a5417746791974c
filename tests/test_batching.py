"""Adapters served together in one batch answer exactly as each does alone (temperature 0).

Multi-LoRA batching gathers each request's own LoRA weights inside one batched forward pass; a mix-up
between the requests of a batch (wrong slot, wrong index) would give one tenant another's adapter. Ten
adapters plus the base model are asked the same prompt one at a time, then all at once; every answer
must match its solo answer token for token. A divergence is reported with the token where it begins.

This test found one: vLLM's CPU LoRA ops gave base-model requests in a mixed batch the adapter in the
last slot. Engines started from this package load its vLLM plugin (`server/engine/vllm_fix.py`), which
keeps adapters off base-model rows; `LORASERVE_BASE_THROUGH_ZERO_ADAPTER` is the fallback for engines
without it (`adapters.zero`). This test runs the default: the plugin.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.numpy import load_file

from adapters.validate import BaseModelSpec, validate_adapter_dir
from adapters.zero import ensure_zero_adapter
from tests.conftest import make_peft_adapter

ADAPTERS = 10
TENANT = "batched"
PROMPT = "Write one sentence about the sea."
TOKENS = 24


@pytest.fixture(scope="module")
def batched_tenant(gateway, base_model_path, tmp_path_factory):
    store, registry = gateway.services.store, gateway.services.registry
    store.create_tenant(TENANT)
    key = store.create_key(TENANT)[1]
    folder = tmp_path_factory.mktemp("batched")
    targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")]
    for i in range(ADAPTERS):
        # Strong adapters (large B), so every answer differs and any mix-up would show.
        source = make_peft_adapter(base_model_path, folder / f"a{i}", seed=100 + i, targets=targets[i % len(targets)],
                                   b_std=0.3)
        registry.publish(source, TENANT, f"a{i}", origin="test")
    return key


def test_the_zero_adapter_is_a_valid_adapter_that_adds_nothing(base_model_path, tmp_path):
    spec = BaseModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct", base_model_path, 16)
    folder = ensure_zero_adapter(tmp_path / "zero", spec)
    info = validate_adapter_dir(folder, spec)
    assert info.rank == 1
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(not t.any() for t in tensors.values())
    before = (folder / "adapter_config.json").stat().st_mtime_ns
    assert ensure_zero_adapter(folder, spec) == folder
    assert (folder / "adapter_config.json").stat().st_mtime_ns == before, "a valid one is kept"
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1}))
    validate_adapter_dir(ensure_zero_adapter(folder, spec), spec)  # a broken one is rewritten


def tokens(client, model: str, barrier: threading.Barrier | None = None) -> list[str]:
    if barrier is not None:
        barrier.wait(timeout=60)  # all requests leave together, so the engine schedules them in one batch
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS, temperature=0,
        logprobs=True,
    )
    return [t.token for t in reply.choices[0].logprobs.content]


def first_difference(a: list[str], b: list[str]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_ten_adapters_in_one_batch_answer_as_each_does_alone(gateway, batched_tenant):
    client = gateway.client(batched_tenant)
    models = [f"a{i}" for i in range(ADAPTERS)] + [gateway.settings.served_model_name]
    alone = {model: tokens(client, model) for model in models}
    assert len({tuple(t) for t in alone.values()}) == len(models), "each adapter answers differently"

    barrier = threading.Barrier(len(models))
    with ThreadPoolExecutor(len(models)) as pool:
        together = dict(zip(models, pool.map(lambda m: tokens(client, m, barrier), models), strict=True))

    divergences = {}
    for model in models:
        at = first_difference(alone[model], together[model])
        if at is not None:
            divergences[model] = (f"token {at}: alone {''.join(alone[model][at:at + 5])!r} "
                                  f"vs together {''.join(together[model][at:at + 5])!r}")
    assert not divergences, divergences
