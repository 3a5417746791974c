"""vLLM's CPU `add_lora_linear` (shrink then expand, for every slice of a module) in one pass over the batch.

vLLM 0.32's `PunicaWrapperCPU.add_lora_linear` runs a shrink and an expand op per slice (three of each for a fused
q/k/v projection, two for gate/up), and each op on its own regroups the batch, gathers its rows and scatters its
result; in prefill each also first rebuilds per-token indices from per-sequence ones. On a small model that Python
and indexing, not the LoRA math, is most of the LoRA path's time. Here the batch's rows are grouped by slot once
(`grouped_lora_ops.slot_groups`), gathered once, every slice's shrink and expand computed on that gather (one
batched matmul over all slots where padding costs little, else one matmul per slot's run), and the result added to
the output once. A module none of the batch's adapters targets (all its slots' weights zero: the MLP, for an adapter
on q/k/v/o) costs nothing at all. Rows of index -1 (no adapter) are left as they were, as vLLM's GPU kernels leave
them.

The arithmetic is vLLM's: the shrink in float32 (vLLM's buffer), scaled, the expand in the output's dtype, added to
the output. Anything this does not cover (a caller's own `buffer`, rows that do not match the indices) goes to
`fallback`, vLLM's own method with the fixed ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from server.engine.grouped_lora_ops import padded_plan, slot_groups, slot_weights


class _Slice(NamedTuple):
    """One output slice of a module: its columns, and its A and B matrices per slot (`slot_weights`)."""

    offset: int
    width: int
    a: list
    b: list
    a_stacked: torch.Tensor
    b_stacked: torch.Tensor
    live: list[bool]  # the slot holds weights in both A and B


def grouped_add_lora_linear(fallback: Callable) -> Callable:
    """`PunicaWrapperCPU.add_lora_linear`, grouped; `fallback` is the method it replaces."""

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        indices = self.token_lora_indices
        rows, out = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if buffer is not None or indices.dim() != 1 or not rows.shape[0] == out.shape[0] == indices.shape[0] > 0:
            return fallback(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        lora_linear(out, rows, lora_a_stacked, lora_b_stacked, scale, output_slices, indices)

    add_lora_linear._skips_no_lora_rows = True
    return add_lora_linear


def lora_linear(y: torch.Tensor, x: torch.Tensor, a_stacks: tuple, b_stacks: tuple, scale: float,
                output_slices: tuple[int, ...], indices: torch.Tensor) -> None:
    """y[r, slice i] += (x[r] @ A_i[s].T * scale) @ B_i[s].T for every row r of slot s = indices[r] >= 0."""
    groups = slot_groups(indices)
    used = {slot for slot, _, _ in groups.spans}
    slices, offset = [], 0
    for a_stack, b_stack, width in zip(a_stacks, b_stacks, output_slices, strict=True):
        a, a_stacked = slot_weights(a_stack, a_stack.shape[-2], torch.float32)
        b, b_stacked = slot_weights(b_stack, width, y.dtype)
        live = [m is not None and n is not None for m, n in zip(a, b, strict=True)]
        if any(live[slot] for slot in used):  # else no adapter of this batch targets this slice
            slices.append(_Slice(offset, width, a, b, a_stacked, b_stacked, live))
        offset += width
    if not slices:
        return
    if groups.order is None:  # one slot for the whole batch: no gather, no scatter
        slot, inputs = groups.spans[0][0], x.to(torch.float32)
        for part in slices:
            shrunk = (inputs @ part.a[slot]).mul_(scale).to(y.dtype)
            y[:, part.offset:part.offset + part.width].add_(shrunk @ part.b[slot])
        return
    order, slots = groups.order, slices[0].a_stacked.shape[0]
    plan = padded_plan(groups, slots)
    values = torch.zeros((order.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
    if plan is not None:  # many slots, few rows each (decode): batched matmuls over every slot
        padded = x.index_select(0, plan.gather).to(torch.float32).view(slots, plan.rows, -1)
        for part in slices:
            shrunk = torch.bmm(padded, part.a_stacked).mul_(scale).to(y.dtype)  # empty slots: zeros, added as zeros
            expanded = torch.bmm(shrunk, part.b_stacked).view(-1, part.width)
            values[:, part.offset:part.offset + part.width] = expanded.index_select(0, plan.scatter)
    else:  # few slots or long runs (prefill): one matmul per slot's run and slice
        gathered = x.index_select(0, order).to(torch.float32)
        for slot, start, end in groups.spans:
            for part in slices:
                if part.live[slot]:
                    shrunk = (gathered[start:end] @ part.a[slot]).mul_(scale).to(y.dtype)
                    values[start:end, part.offset:part.offset + part.width] = shrunk @ part.b[slot]
    y.index_add_(0, order, values)
