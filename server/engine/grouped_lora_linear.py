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

import torch

from server.engine.grouped_lora_ops import _slot_weights, padded_plan, slot_groups


def grouped_add_lora_linear(fallback: Callable) -> Callable:
    """`PunicaWrapperCPU.add_lora_linear`, grouped; `fallback` is the method it replaces."""

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        indices = self.token_lora_indices
        rows = x.view(-1, x.shape[-1])
        if buffer is not None or indices.dim() != 1 or not rows.shape[0] == y.view(-1, y.shape[-1]).shape[0] == \
                indices.shape[0] > 0:
            return fallback(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        lora_linear(y.view(-1, y.shape[-1]), rows, lora_a_stacked, lora_b_stacked, scale, output_slices, indices)

    add_lora_linear._skips_no_lora_rows = True
    return add_lora_linear


def lora_linear(y: torch.Tensor, x: torch.Tensor, a_stacks: tuple, b_stacks: tuple, scale: float,
                output_slices: tuple[int, ...], indices: torch.Tensor) -> None:
    """y[r, slice i] += (x[r] @ A_i[s].T * scale) @ B_i[s].T for every row r of slot s = indices[r] >= 0."""
    groups = slot_groups(indices)
    if not groups.spans:
        return
    slices, offset = [], 0
    for a, b, width in zip(a_stacks, b_stacks, output_slices, strict=True):
        a_matrices, a_stacked = _slot_weights(a, a.shape[-2], torch.float32)
        b_matrices, b_stacked = _slot_weights(b, width, y.dtype)
        live = [m is not None and n is not None for m, n in zip(a_matrices, b_matrices, strict=True)]
        slices.append((offset, width, a_matrices, b_matrices, a_stacked, b_stacked, live))
        offset += width
    used = {slot for slot, _, _ in groups.spans}
    slices = [s for s in slices if any(s[6][slot] for slot in used)]
    if not slices:  # no adapter of this batch targets this module
        return
    if groups.order is None:  # one slot for the whole batch: no gather, no scatter
        slot = groups.spans[0][0]
        inputs = x.to(torch.float32)
        for offset, width, a_matrices, b_matrices, _, _, live in slices:
            if live[slot]:
                shrunk = (inputs @ a_matrices[slot]).mul_(scale).to(y.dtype)
                y[:, offset:offset + width].add_(shrunk @ b_matrices[slot])
        return
    order = groups.order
    plan = padded_plan(groups, slices[0][4].shape[0])
    values = torch.zeros((order.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
    if plan is not None:  # many slots, few rows each (decode): batched matmuls over every slot
        slots = slices[0][4].shape[0]
        padded = x.index_select(0, plan.gather).to(torch.float32).view(slots, plan.rows, -1)
        for offset, width, _, _, a_stacked, b_stacked, _ in slices:
            shrunk = torch.bmm(padded, a_stacked).mul_(scale).to(y.dtype)  # empty slots: zeros, added as zeros
            expanded = torch.bmm(shrunk, b_stacked).view(-1, width)
            values[:, offset:offset + width] = expanded.index_select(0, plan.scatter)
    else:  # few slots or long runs (prefill): one matmul per slot's run and slice
        gathered = x.index_select(0, order).to(torch.float32)
        for slot, start, end in groups.spans:
            for offset, width, a_matrices, b_matrices, _, _, live in slices:
                if live[slot]:
                    shrunk = (gathered[start:end] @ a_matrices[slot]).mul_(scale).to(y.dtype)
                    values[start:end, offset:offset + width] = shrunk @ b_matrices[slot]
    y.index_add_(0, order, values)
