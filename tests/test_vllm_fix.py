"""The vLLM plugin that keeps adapters off base-model rows of a mixed batch and groups the adapter rows by slot
(server/engine/vllm_fix.py, server/engine/grouped_lora_ops.py).

The end-to-end check is `test_batching.py` on the real engine (a mixed batch answers token for token as each
request alone); these pin the op-level rules against vLLM's own ops."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu

from server.engine import grouped_lora_ops, vllm_fix
from server.engine.grouped_lora_ops import (
    GROUPED,
    padded_plan,
    slot_groups,
    slot_matrices,
    slot_written,
    stack_versions,
)


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


def vllm_op(name: str):
    """vLLM's own op, with only the -1 rule: what the grouped op must equal."""
    op = getattr(lora_ops, name)
    return vllm_fix.skip_no_lora_rows(getattr(op, "__wrapped__", op))


def layouts(generator: torch.Generator, tokens: int, slots: int):
    """Per-token slot indices as vLLM builds them: decode (any slot per row), prefill (runs of one request's
    tokens, as sgmv's repeat_interleave makes them), one adapter for the whole batch, and no adapter at all."""
    yield "decode", torch.randint(-1, slots, (tokens,), generator=generator)
    lengths = torch.randint(1, 40, (5,), generator=generator)
    starts = torch.randint(-1, slots, (5,), generator=generator)
    yield "prefill", torch.repeat_interleave(starts, lengths)
    yield "one-slot", torch.full((tokens,), slots - 1)
    yield "no-adapter", torch.full((tokens,), -1)


def check_against_vllm(name: str, indices: torch.Tensor, args: tuple, width: int, generator, where: str) -> None:
    """The grouped op equals vLLM's on a random output buffer; rows of index -1 keep what they held."""
    start = torch.randn(indices.shape[0], width, generator=generator)
    expected, got = start.clone(), start.clone()
    vllm_op(name)(*args[:2], expected, indices, *args[2:])
    GROUPED[name](vllm_op(name))(*args[:2], got, indices, *args[2:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name}: {where}")
    assert torch.equal(got[indices < 0], start[indices < 0]), f"{name}: a -1 row changed ({where})"


CASES = [(slots, rank, stacked_4d) for slots in (1, 3, 8) for rank in (1, 8, 16) for stacked_4d in (True, False)]


@pytest.mark.parametrize(("slots", "rank", "stacked_4d"), CASES)
def test_grouped_ops_equal_vllms_ops(slots, rank, stacked_4d):
    generator = torch.Generator().manual_seed(slots * 100 + rank)
    hidden, out = 48, 40

    def weights(*shape):
        w = torch.randn(slots, 1, *shape, generator=generator)
        return w if stacked_4d else w[:, 0]

    for tokens in (1, 7, 64):
        for layout, indices in layouts(generator, tokens, slots):
            rows, where = indices.shape[0], f"{layout}, {indices.shape[0]} rows, {slots} slots, rank {rank}"
            x = torch.randn(rows, hidden, generator=generator)
            check_against_vllm("bgmv_shrink", indices, (x, weights(rank, hidden), 0.5), rank + 3, generator, where)
            h = torch.randn(rows, rank, generator=generator)
            for add in (True, False):
                for lora_out, model_out in ((out, out), (out, out - 8), (out - 8, out)):  # either may pad more
                    check_against_vllm("bgmv_expand", indices, (h, weights(lora_out, rank), add), model_out,
                                       generator, where)
                check_against_vllm("bgmv_expand_slice", indices, (h, weights(16, rank), 8, 16, add), out,
                                   generator, where)


def test_many_slots_with_few_rows_take_one_batched_matmul_and_equal_vllms_ops():
    """Decode with many adapters (one row per slot, a few slots twice, empty slots, -1 rows) goes through the
    padded batched matmul; padding repeats a real row whose products must never reach the output. A prefill
    beside the decodes would pad too much and keeps the per-slot loop."""
    generator = torch.Generator().manual_seed(21)
    slots, rank, hidden, out = 16, 8, 48, 40
    indices = torch.tensor([3, -1, 0, 5, 5, 9, 15, 2, 7, 3, 11, -1, 12, 1, 4, 6, 8, 10, 13, 14])
    assert padded_plan(slot_groups(indices), slots) is not None, "this batch should take the batched path"
    a, b = torch.randn(slots, 1, rank, hidden, generator=generator), torch.randn(slots, out, rank, generator=generator)
    a[4], b[9] = 0, 0  # slots whose module the adapter does not target
    x, h = torch.randn(len(indices), hidden, generator=generator), torch.randn(len(indices), rank, generator=generator)
    check_against_vllm("bgmv_shrink", indices, (x, a, 0.5), rank, generator, "batched shrink")
    for add in (True, False):
        check_against_vllm("bgmv_expand", indices, (h, b, add), out, generator, f"batched expand, add {add}")
        check_against_vllm("bgmv_expand_slice", indices, (h, b[:, :16], 8, 16, add), out, generator,
                           f"batched expand_slice, add {add}")
    bf16 = (x.bfloat16(), a.bfloat16(), 1.0)
    expected, got = torch.zeros(len(indices), rank), torch.zeros(len(indices), rank)
    vllm_op("bgmv_shrink")(*bf16[:2], expected, indices, bf16[2])
    GROUPED["bgmv_shrink"](vllm_op("bgmv_shrink"))(*bf16[:2], got, indices, bf16[2])
    torch.testing.assert_close(got, expected)

    prefill = torch.cat([torch.full((64,), 3), torch.arange(16)])
    assert padded_plan(slot_groups(prefill), slots) is None, "a long run should keep the per-slot loop"


def test_grouped_ops_cast_like_vllm():
    """bf16 inputs and weights into an fp32 buffer (shrink) and fp32 into bf16 (expand), as the engine runs them."""
    generator = torch.Generator().manual_seed(7)
    indices = torch.tensor([0, 2, -1, 1, 0, 2])
    x = torch.randn(6, 32, generator=generator).bfloat16()
    a = torch.randn(3, 1, 8, 32, generator=generator).bfloat16()
    expected, got = torch.zeros(6, 8), torch.zeros(6, 8)
    vllm_op("bgmv_shrink")(x, a, expected, indices, 1.0)
    GROUPED["bgmv_shrink"](vllm_op("bgmv_shrink"))(x, a, got, indices, 1.0)
    torch.testing.assert_close(got, expected)
    a[1].mul_(-2)  # a new adapter in slot 1: the fp32 copies of the bf16 stack must be made again
    vllm_op("bgmv_shrink")(x, a, expected, indices, 1.0)
    GROUPED["bgmv_shrink"](vllm_op("bgmv_shrink"))(x, a, got, indices, 1.0)
    torch.testing.assert_close(got, expected)
    b = torch.randn(3, 1, 24, 8, generator=generator).bfloat16()
    expected, got = torch.zeros(6, 24).bfloat16(), torch.zeros(6, 24).bfloat16()
    vllm_op("bgmv_expand")(expected.float()[:, :8], b, expected, indices, True)
    GROUPED["bgmv_expand"](vllm_op("bgmv_expand"))(got.float()[:, :8], b, got, indices, True)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_prefill_ops_reach_the_grouped_ops_through_vllms_module(monkeypatch):
    """vLLM's sgmv_* (prefill) call bgmv_* by module global: patching the module covers prefill."""
    calls = []
    original = lora_ops.bgmv_shrink
    monkeypatch.setattr(lora_ops, "bgmv_shrink", lambda *a, **k: calls.append(a[3].tolist()) or original(*a, **k))
    x, output = torch.randn(5, 8), torch.zeros(5, 4)
    lora_ops.sgmv_shrink(x, torch.randn(2, 1, 4, 8), output, torch.tensor([0, 3]), torch.tensor([3, 2]),
                         torch.tensor([1, 0]), 2, 3, 5, 1.0)
    assert calls == [[1, 1, 1, 0, 0]]


def unpatch(monkeypatch) -> None:
    """vLLM's ops back in both modules (as before any register() of this process), restored after the test."""
    for name in vllm_fix._OPS:
        op = getattr(lora_ops, name)
        monkeypatch.setattr(lora_ops, name, getattr(op, "__wrapped__", op))
        monkeypatch.setattr(punica_cpu, name, getattr(lora_ops, name))


@pytest.mark.parametrize(("setting", "grouped"), [(None, True), ("false", False), ("0", False)])
def test_the_setting_chooses_grouped_or_vllms_own_math_and_the_engine_log_says_which(
        monkeypatch, caplog, setting, grouped):
    unpatch(monkeypatch)
    if setting is None:
        monkeypatch.delenv(vllm_fix.GROUPED_OPS_ENV, raising=False)
    else:
        monkeypatch.setenv(vllm_fix.GROUPED_OPS_ENV, setting)
    with caplog.at_level(logging.INFO, logger=vllm_fix.log.name):
        vllm_fix.register()
        vllm_fix.register()
    assert len(caplog.records) == 1, "logged once"
    assert ("grouped by slot" if grouped else "vLLM's per-token ops") in caplog.text
    for name in vllm_fix._OPS:
        op = getattr(punica_cpu, name)
        assert op is getattr(lora_ops, name) and op._skips_no_lora_rows
        assert (op.__code__ is GROUPED[name](None).__code__) == grouped


def test_slot_groups_follow_the_indices_values_not_the_tensor():
    """The groups are kept for the next layer's call; vLLM rewrites its index buffers in place between steps,
    so an in-place change must give fresh groups, and equal values in another tensor the same ones."""
    indices = torch.tensor([0, 1, 0, -1])
    first = slot_groups(indices)
    assert first.order.tolist() == [0, 2, 1] and first.spans == [(0, 0, 2), (1, 2, 3)]
    assert slot_groups(indices.clone()) is first
    indices[1] = 0
    assert slot_groups(indices).order.tolist() == [0, 1, 2] and slot_groups(indices).spans == [(0, 0, 3)]
    indices.fill_(2)
    assert slot_groups(indices) == (None, [(2, 0, 4)])
    indices.fill_(-1)
    assert slot_groups(indices) == (None, [])


def test_slots_without_weights_skip_the_math_and_still_equal_vllms_ops():
    """vLLM stacks zeros in every module an adapter does not target (its MLP, for a q/k/v/o adapter); the grouped
    ops skip those slots. A skipped shrink must still write its zeros, an expand that does not add as well, on
    output buffers holding garbage."""
    generator = torch.Generator().manual_seed(11)
    indices = torch.tensor([0, 1, 2, -1, 1, 0, 2, 2])
    a, b, b_slice = (torch.randn(3, 1, *shape, generator=generator) for shape in ((8, 32), (24, 8), (16, 8)))
    for stack in (a, b, b_slice):
        stack[1] = 0  # vLLM's reset_lora
    x, h = torch.randn(8, 32, generator=generator), torch.randn(8, 8, generator=generator)
    check_against_vllm("bgmv_shrink", indices, (x, a, 0.5), 8, generator, "slot 1 empty")
    assert [m is not None for m in slot_matrices(a, 8, a.dtype)] == [True, False, True]
    for add in (True, False):
        check_against_vllm("bgmv_expand", indices, (h, b, add), 24, generator, f"slot 1 empty, add {add}")
        check_against_vllm("bgmv_expand_slice", indices, (h, b_slice, 8, 16, add), 32, generator,
                           f"slot 1 empty, add {add}")
    one_empty_slot = torch.ones(8, dtype=torch.long)
    check_against_vllm("bgmv_shrink", one_empty_slot, (x, a, 0.5), 8, generator, "the batch's one slot empty")
    check_against_vllm("bgmv_expand", one_empty_slot, (h, b, False), 24, generator, "the batch's one slot empty")


def test_which_slots_hold_weights_follows_every_write_to_the_stack():
    """The answer is kept per stack; vLLM writes a slot in place on each adapter load (a copy into a view of the
    stack) and unload (an assignment of zeros), so each write must be seen, or a newly loaded adapter would be
    skipped (or an unloaded one still applied)."""
    generator = torch.Generator().manual_seed(12)
    stack = torch.zeros(4, 1, 8, 32)

    def live_slots(weights):
        return [m is not None for m in slot_matrices(weights, 8, weights.dtype)]

    assert live_slots(stack) == [False] * 4
    stack[2, 0, :4, :].copy_(torch.randn(4, 32, generator=generator))  # set_lora: a smaller rank into the slot
    assert live_slots(stack) == [False, False, True, False]
    indices, x = torch.tensor([2, 2, 0, 3]), torch.randn(4, 32, generator=generator)
    check_against_vllm("bgmv_shrink", indices, (x, stack, 1.0), 8, generator, "after a load")
    stack[2, 0, :4, :].mul_(2)  # another adapter into the same slot: the kept matrices must not be stale
    check_against_vllm("bgmv_shrink", indices, (x, stack, 1.0), 8, generator, "after a reload")
    stack[2] = 0  # reset_lora
    assert live_slots(stack) == [False] * 4
    check_against_vllm("bgmv_shrink", indices, (x, stack, 1.0), 8, generator, "after an unload")
    other = torch.ones(4, 1, 8, 32)  # another stack (maybe at a freed one's address) has its own answer
    assert live_slots(other) == [True] * 4


def test_a_recorded_slot_write_rechecks_that_slot_alone_and_anything_else_the_whole_stack(monkeypatch):
    """An adapter activation writes one slot of every stack (`slot_written`, from the vLLM hook): only that slot is
    looked at again. A write the hook did not see (or a chain of writes with a gap) must fall back to checking every
    slot, or a slot changed behind its back would keep a stale answer."""
    checked = []
    live_slots = grouped_lora_ops._live_slots
    monkeypatch.setattr(grouped_lora_ops, "_live_slots", lambda w: checked.append(w.shape[0]) or live_slots(w))
    for dtype in (torch.float32, torch.bfloat16):  # fp32 matrices of a bf16 stack are copies: refreshed per slot
        stack = torch.zeros(4, 1, 8, 32, dtype=dtype)

        def live(weights=stack):
            return [m is not None for m in slot_matrices(weights, 8, torch.float32)]

        assert live() == [False] * 4 and checked == [4]
        for slot in (1, 3):  # two activations before the next forward step: both slots, and only them
            before = stack_versions()
            stack[slot] = 0
            stack[slot, 0, :4].copy_(torch.full((4, 32), float(slot)))
            slot_written(before, slot)
        checked.clear()
        assert live() == [False, True, False, True] and checked == [1, 1], dtype
        assert torch.equal(slot_matrices(stack, 8, torch.float32)[3][:, :4], torch.full((32, 4), 3.0))
        stack[0, 0, 0, 0] = 1.0  # a write nobody recorded, then a recorded one: the whole stack again
        before = stack_versions()
        stack[2] = 0
        slot_written(before, 2)
        checked.clear()
        assert live() == [True, True, False, True] and checked == [4], dtype
        checked.clear()


def test_the_hook_records_the_slot_each_activation_wrote(monkeypatch):
    """vllm_fix wraps vLLM's LoRAModelManager.activate_adapter (once) and records the slot it chose."""
    from vllm.lora.model_manager import LoRAModelManager

    stack = torch.zeros(3, 1, 8, 32)
    assert slot_matrices(stack, 8, stack.dtype) == [None] * 3

    def activate_adapter(self, lora_id):  # vLLM's: the first free slot gets the adapter's weights
        slot = self.lora_index_to_id.index(None)
        self.lora_index_to_id[slot] = lora_id
        stack[slot].fill_(1.0)
        return True

    monkeypatch.setattr(LoRAModelManager, "activate_adapter", activate_adapter)
    vllm_fix.track_slot_writes()
    vllm_fix.track_slot_writes()
    assert LoRAModelManager.activate_adapter.__wrapped__ is activate_adapter, "wrapped once"
    manager = type("Manager", (), {"lora_index_to_id": [7, None, None]})()
    LoRAModelManager.activate_adapter(manager, 9)
    checked = []
    live_slots = grouped_lora_ops._live_slots
    monkeypatch.setattr(grouped_lora_ops, "_live_slots", lambda w: checked.append(w.shape[0]) or live_slots(w))
    assert [m is not None for m in slot_matrices(stack, 8, stack.dtype)] == [False, True, False]
    assert checked == [1], "taken as one recorded slot write, not a full check"
