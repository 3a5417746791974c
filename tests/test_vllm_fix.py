"""The vLLM plugin that keeps adapters off base-model rows of a mixed batch (server/engine/vllm_fix.py).

The end-to-end check is `test_batching.py` on the real engine; these pin the op-level rule."""

from __future__ import annotations

from importlib.metadata import entry_points

import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu

from server.engine import vllm_fix


def stacked(slots: int, rows: int, cols: int) -> torch.Tensor:
    """LoRA weights as vLLM stacks them: one slot per adapter, slot k filled with k + 1."""
    return torch.stack([torch.full((1, rows, cols), float(k + 1)) for k in range(slots)])


def test_rows_without_an_adapter_are_left_alone_and_the_others_computed_as_before():
    inputs, indices = torch.ones(3, 4), torch.tensor([-1, 0, 1])
    for name in ("bgmv_shrink", "bgmv_expand"):
        original = getattr(lora_ops, name)
        original = getattr(original, "__wrapped__", original)
        weights = stacked(2, 4, 4)
        expected, output = torch.full((3, 4), 7.0), torch.full((3, 4), 7.0)
        original(inputs, weights, expected, indices.clamp(min=0))
        vllm_fix.skip_no_lora_rows(original)(inputs, weights, output, indices)
        assert torch.equal(output[0], torch.full((4,), 7.0)), f"{name}: the base-model row changed"
        assert torch.equal(output[1:], expected[1:]), f"{name}: adapter rows differ from the unpatched op"

    original = getattr(lora_ops.bgmv_expand_slice, "__wrapped__", lora_ops.bgmv_expand_slice)
    output = torch.zeros(3, 8)
    vllm_fix.skip_no_lora_rows(original)(inputs, stacked(2, 4, 4), output, indices, 4, 4, True)
    assert not output[0].any() and not output[:, :4].any() and output[1:, 4:].all()


def test_vllm_loads_the_plugin_and_it_patches_the_cpu_ops():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loraserve_cpu_lora_fix") == "server.engine.vllm_fix:register"
    vllm_fix.register()
    vllm_fix.register()  # vLLM may load plugins more than once in a process
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        op = getattr(punica_cpu, name)
        assert op is getattr(lora_ops, name) and op._skips_no_lora_rows
        assert not getattr(op.__wrapped__, "_skips_no_lora_rows", False), "wrapped once, not twice"
