"""vLLM's three row-wise CPU LoRA ops, computed one matmul per adapter slot instead of per token.

vLLM 0.32's CPU ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gather `weights[indices]`: a whole (out x rank)
matrix copied for every token, then a batched einsum; at 512 prefill tokens that is ~25x the math itself. Here
the rows of a batch are grouped by slot (one stable sort of the indices) and each group does
`x[rows] @ W[slot].T`: the same sums, no weight copies. Rows of index -1 (no adapter) are left as they were,
as vLLM's GPU kernels leave them (vllm-project/vllm#48421: the CPU ops give them the last slot's adapter).

Signatures and semantics are those of vLLM's `bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice`; the
`sgmv_*` prefill ops call these through their module, so one patch covers prefill and decode. Shapes the
grouping does not cover (an output whose row count differs from the indices') go to `fallback`, vLLM's own op.
Pure torch: nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def slot_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | slice]]:
    """(slot, rows) for each adapter slot in `indices`; rows is a slice when the whole batch shares one slot.

    Every LoRA layer of one forward step asks with the same indices (hundreds of calls a step), so the last
    few answers are kept, keyed by the indices' values: comparing them costs ~1 us, grouping ~20 us."""
    for i, (known, groups) in enumerate(_recent):
        if known.shape == indices.shape and torch.equal(known, indices):
            if i:
                _recent.insert(0, _recent.pop(i))
            return groups
    groups = list(_slot_groups(indices))
    _recent.insert(0, (indices.clone(), groups))
    del _recent[_RECENT:]
    return groups


_RECENT = 4  # token indices (decode or prefill), sampler indices, and a spare
_recent: list[tuple[torch.Tensor, list]] = []


def _slot_groups(indices: torch.Tensor) -> Iterator[tuple[int, torch.Tensor | slice]]:
    first, last = int(indices.min()), int(indices.max())
    if first == last:  # decode with one adapter, or a prefill of one request: no gather at all
        if first >= 0:
            yield first, slice(None)
        return
    order = torch.argsort(indices, stable=True)
    slots, counts = torch.unique_consecutive(indices[order], return_counts=True)
    for slot, rows in zip(slots.tolist(), torch.split(order, counts.tolist()), strict=True):
        if slot >= 0:
            yield slot, rows


def _matrix(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """One slot's (out x in) matrix; vLLM stacks them as (slots, 1, out, in) or (slots, out, in)."""
    matrix = weights[slot]
    return (matrix[0] if matrix.dim() == 3 else matrix).to(dtype=dtype)


def _rows(x: torch.Tensor, rows: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
    return x[rows].to(dtype=dtype)


def _store(output: torch.Tensor, rows, cols: slice, values: torch.Tensor, add: bool) -> None:
    if isinstance(rows, slice):
        view = output[:, cols]
        view.add_(values) if add else view.copy_(values)
    elif add:
        output[rows, cols] += values
    else:
        output[rows, cols] = values


def grouped_shrink(fallback: Callable) -> Callable:
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
        if not _groupable(inputs, output_tensor, lora_indices_tensor):
            return fallback(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        dtype = output_tensor.dtype
        for slot, rows in slot_groups(lora_indices_tensor):
            shrunk = _rows(inputs, rows, dtype) @ _matrix(lora_a_weights, slot, dtype).T
            _store(output_tensor, rows, slice(0, shrunk.shape[1]), shrunk.mul_(scaling), add=False)

    return bgmv_shrink


def grouped_expand(fallback: Callable) -> Callable:
    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
        if not _groupable(inputs, output_tensor, lora_indices_tensor):
            return fallback(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        dtype = output_tensor.dtype
        for slot, rows in slot_groups(lora_indices_tensor):
            matrix = _matrix(lora_b_weights, slot, dtype)
            # LoRA and model may pad their outputs differently: write the columns both have
            width = min(matrix.shape[0], output_tensor.shape[1])
            expanded = _rows(inputs, rows, dtype) @ matrix[:width].T
            _store(output_tensor, rows, slice(0, width), expanded, add=add_inputs)

    return bgmv_expand


def grouped_expand_slice(fallback: Callable) -> Callable:
    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                          slice_size: int, add_inputs: bool = True):
        if not _groupable(inputs, output_tensor, lora_indices_tensor):
            return fallback(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                            add_inputs)
        dtype = output_tensor.dtype
        for slot, rows in slot_groups(lora_indices_tensor):
            expanded = _rows(inputs, rows, dtype) @ _matrix(lora_b_weights, slot, dtype).T
            _store(output_tensor, rows, slice(slice_offset, slice_offset + slice_size), expanded, add=add_inputs)

    return bgmv_expand_slice


def _groupable(inputs: torch.Tensor, output: torch.Tensor, indices: torch.Tensor) -> bool:
    """One index per input row and per output row (vLLM broadcasts a single row in a case not used here)."""
    return indices.dim() == 1 and indices.shape[0] == inputs.shape[0] == output.shape[0] > 0


GROUPED = {"bgmv_shrink": grouped_shrink, "bgmv_expand": grouped_expand, "bgmv_expand_slice": grouped_expand_slice}
