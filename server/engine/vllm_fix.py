"""A vLLM plugin for the CPU backend's LoRA ops: base-model rows of a mixed batch get no adapter, and the
adapter rows are computed one matmul per slot (server/engine/grouped_lora_ops.py).

vLLM's CPU LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`, 0.32) pick each row's adapter with
`weights[indices]`; a base-model row's index is -1, which selects the LAST adapter slot, so a base-model
request batched with adapter requests is served with another tenant's adapter (vllm-project/vllm#48421,
open). The GPU kernels skip such rows. This plugin wraps the three row-wise ops so rows with index -1
keep their output untouched, as the GPU kernels do. By default it also replaces vLLM's per-token weight gather
with the grouped ops; `LORASERVE_ENGINE_GROUPED_LORA_OPS=false` (a setting, which the gateway passes to the engine's
processes, where this runs) keeps vLLM's own math, with only the -1 rule.

vLLM loads it in every engine process through the `vllm.general_plugins` entry point of this package
(see pyproject.toml), so every engine started from this installation (`loraserve engine`, the embedded
one) has it. The module imports nothing from the gateway.
"""

from __future__ import annotations

import functools
import logging
import os

# Under vLLM's own logger, whose handler writes the engine log (a logger of another name has none there).
log = logging.getLogger("vllm.plugins.loraserve")
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
GROUPED_OPS_ENV = "LORASERVE_ENGINE_GROUPED_LORA_OPS"  # the one gateway setting the engine is given (supervisor.py)


def register() -> None:
    """vLLM's entry point: patch the CPU LoRA ops once per process."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to fix
        return
    from server.engine.grouped_lora_ops import GROUPED  # torch: imported in engine processes only

    guard_prompt_logits(punica_cpu.PunicaWrapperCPU)
    grouped, patched = grouped_ops_enabled(), False
    if grouped:
        track_slot_writes()
        group_lora_linear(punica_cpu.PunicaWrapperCPU)
    for name in _OPS:
        original = getattr(lora_ops, name)
        if getattr(original, "_skips_no_lora_rows", False):
            continue  # vLLM may load plugins more than once in a process
        patched = True
        fixed = skip_no_lora_rows(original)
        if grouped:
            fixed = functools.wraps(original)(GROUPED[name](fixed))
            fixed._skips_no_lora_rows = True
        setattr(lora_ops, name, fixed)  # the sgmv_* ops call these through the module
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fixed)  # imported there by name
    if patched:
        log.info("CPU LoRA ops patched: base-model rows of mixed batches get no adapter; %s",
                 "adapter rows grouped by slot (one matmul per slot, all slices of a module in one pass)" if grouped
                 else "vLLM's per-token ops (LORASERVE_ENGINE_GROUPED_LORA_OPS=false)")


def guard_prompt_logits(wrapper: type) -> None:
    """Prompt logprobs (`echo` with `logprobs`, `prompt_logprobs`) in a batch of several requests must not kill the
    engine. vLLM computes one request's prompt logits apart from the batch, with the CPU wrapper's logits LoRA still
    mapped per *sampled* row: its einsum then fails on the row count and the engine core dies, for every tenant.
    Those rows' adapter is not known there; where no adapter in the slots has an output-layer LoRA (this server's
    adapters are on linear layers inside the model; SmolLM2 ties its output layer) the delta is zero and skipping
    it is exact. One sampled row (the request alone) keeps vLLM's path, which applies that request's adapter."""
    original = wrapper.add_lora_logits
    if getattr(original, "_guards_prompt_rows", False):
        return
    warned = []

    @functools.wraps(original)
    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs):
        rows, sampled = x.reshape(-1, x.shape[-1]).shape[0], self.sampler_indices.numel()
        if rows == sampled or sampled == 1:
            return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs)
        if not warned and bool(lora_b_stacked.any()):
            warned.append(True)
            log.warning("prompt logprobs in a batch with an output-layer adapter loaded: computed without that "
                        "adapter's output-layer delta")
        return None

    add_lora_logits._guards_prompt_rows = True
    wrapper.add_lora_logits = add_lora_logits


def group_lora_linear(wrapper: type) -> None:
    """Replace the CPU wrapper's per-slice shrink and expand calls with one grouped pass (grouped_lora_linear.py)."""
    from server.engine.grouped_lora_linear import grouped_add_lora_linear

    original = wrapper.add_lora_linear
    if not getattr(original, "_skips_no_lora_rows", False):
        wrapper.add_lora_linear = functools.wraps(original)(grouped_add_lora_linear(original))


def track_slot_writes() -> None:
    """Tell the grouped ops which slot each adapter activation wrote, so they re-check that slot's weights alone."""
    from vllm.lora.model_manager import LoRAModelManager

    from server.engine.grouped_lora_ops import slot_written, stack_versions

    original = LoRAModelManager.activate_adapter
    if getattr(original, "_tracks_slot_writes", False):
        return

    @functools.wraps(original)
    def activate_adapter(self, lora_id: int) -> bool:
        before = stack_versions()
        activated = original(self, lora_id)
        if activated:  # vLLM wrote this adapter's slot of every stack, and nothing else
            slot_written(before, self.lora_index_to_id.index(lora_id))
        return activated

    activate_adapter._tracks_slot_writes = True
    LoRAModelManager.activate_adapter = activate_adapter


def grouped_ops_enabled() -> bool:
    return os.environ.get(GROUPED_OPS_ENV, "true").strip().lower() not in ("0", "false", "no")


def skip_no_lora_rows(op):
    """`op(inputs, weights, output, indices, ...)` that leaves the output rows of index -1 as they were."""

    @functools.wraps(op)
    def fixed(inputs, weights, output, indices, *args, **kwargs):
        no_lora = indices < 0
        if output.shape[0] != indices.shape[0] or not bool(no_lora.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[no_lora].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[no_lora] = kept
        return result

    fixed._skips_no_lora_rows = True
    return fixed
