"""The plugin's one-pass `add_lora_linear` (server/engine/grouped_lora_linear.py) against vLLM's own method, on a real
`PunicaWrapperCPU` whose ops are vLLM's (with only the -1 rule): every slice, decode and prefill layouts, empty
slots, rows without an adapter, bf16. The end-to-end check is tests/test_batching.py on the real engine."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from server.engine import vllm_fix
from server.engine.grouped_lora_linear import grouped_add_lora_linear
from tests.test_vllm_fix import layouts, vllm_op

ORIGINAL = getattr(PunicaWrapperCPU.add_lora_linear, "__wrapped__", PunicaWrapperCPU.add_lora_linear)


@pytest.fixture
def vllms_ops(monkeypatch):
    """vLLM's own ops (the -1 rule only) in the wrapper's module, as the reference computes with."""
    for name in vllm_fix._OPS:
        op = vllm_op(name)
        monkeypatch.setattr(punica_cpu, name, op)  # decode calls these by name
        monkeypatch.setattr(lora_ops, name, op)  # prefill's sgmv_* call them through the module


def wrapper_for(indices: torch.Tensor, prefill: bool) -> PunicaWrapperCPU:
    """A wrapper holding `indices` as its per-token slots, as vLLM's update_metadata leaves it."""
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=512, max_batches=64, device="cpu")
    wrapper._token_lora_indices[: indices.shape[0]].copy_(indices)
    wrapper.indices_len = [indices.shape[0]] * 4
    if prefill:
        wrapper._update_prefill_metadata(wrapper.token_lora_indices)
    wrapper.is_prefill = prefill
    return wrapper


def stacks(generator, slots: int, rank: int, hidden: int, widths: tuple[int, ...], empty: set[int], dtype):
    """vLLM's per-slice stacks: A (slots, 1, rank, hidden), B (slots, 1, width, rank); `empty` slots all zero."""
    a = tuple(torch.randn(slots, 1, rank, hidden, generator=generator).to(dtype) for _ in widths)
    b = tuple(torch.randn(slots, 1, width, rank, generator=generator).to(dtype) for width in widths)
    for slot in empty:
        for stack in (*a, *b):
            stack[slot] = 0
    return a, b


@pytest.mark.parametrize("slots", [1, 3, 16])
@pytest.mark.parametrize("widths", [(40,), (40, 16, 16), (24, 24)])
def test_one_pass_equals_vllms_add_lora_linear(vllms_ops, slots, widths):
    generator = torch.Generator().manual_seed(slots * 7 + len(widths))
    hidden, rank = 48, 8
    grouped = grouped_add_lora_linear(ORIGINAL)
    for empty in (set(), {0}, set(range(slots))):  # a slot the adapter does not target; the whole module untargeted
        a, b = stacks(generator, slots, rank, hidden, widths, empty, torch.float32)
        for tokens in (1, 7, 64):
            for layout, indices in layouts(generator, tokens, slots):
                where = f"{layout}, {indices.shape[0]} rows, {slots} slots, slices {widths}, empty {sorted(empty)}"
                x = torch.randn(indices.shape[0], hidden, generator=generator)
                start = torch.randn(indices.shape[0], sum(widths) + 4, generator=generator)
                for prefill in (False, True):
                    expected, got = start.clone(), start.clone()
                    ORIGINAL(wrapper_for(indices, prefill), expected, x, a, b, 0.5, widths)
                    grouped(wrapper_for(indices, prefill), got, x, a, b, 0.5, widths)
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=where)
                    assert torch.equal(got[indices < 0], start[indices < 0]), f"a -1 row changed ({where})"


def test_bf16_model_and_a_callers_buffer(vllms_ops):
    """bf16 activations (shrink in fp32, expand in bf16, as vLLM's buffer); a caller-given buffer goes to vLLM's."""
    generator = torch.Generator().manual_seed(3)
    indices = torch.tensor([0, 2, -1, 1, 0, 2, 2])
    a, b = stacks(generator, 3, 8, 32, (24, 8), set(), torch.bfloat16)
    x = torch.randn(7, 32, generator=generator).bfloat16()
    start = torch.randn(7, 32, generator=generator).bfloat16()
    expected, got = start.clone(), start.clone()
    ORIGINAL(wrapper_for(indices, False), expected, x, a, b, 1.0, (24, 8))
    grouped_add_lora_linear(ORIGINAL)(wrapper_for(indices, False), got, x, a, b, 1.0, (24, 8))
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    calls = []
    fallback = grouped_add_lora_linear(lambda *args, **kwargs: calls.append(kwargs["buffer"]))
    buffer = tuple(torch.zeros(7, 8) for _ in range(2))
    fallback(wrapper_for(indices, False), got, x, a, b, 1.0, (24, 8), buffer=buffer)
    assert calls == [buffer]


def test_the_plugin_puts_it_on_the_cpu_wrapper(monkeypatch):
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", ORIGINAL)
    vllm_fix.group_lora_linear(PunicaWrapperCPU)
    vllm_fix.group_lora_linear(PunicaWrapperCPU)
    method = PunicaWrapperCPU.add_lora_linear
    assert method._skips_no_lora_rows and method.__wrapped__ is ORIGINAL, "wrapped once"
