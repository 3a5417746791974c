"""The CPU LoRA ops alone: vLLM's (`vllm/lora/ops/torch_ops/lora_ops.py`) against this package's grouped ones.

    .venv/bin/python bench/lora_ops.py [--slots 4] [--rank 16] [--repeat 50]

One torch thread, 4 adapter slots, rank 16, SmolLM2's MLP shape (576 -> 1536), rows spread over the slots and
no-adapter rows (-1) at random, at a decode-sized batch (32 tokens) and a prefill-sized one (512). Both sides
carry the -1 rule (vLLM's op wrapped by `skip_no_lora_rows`, as the plugin always does), so the difference is
the per-token weight gather alone. Median of --repeat calls after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import print_table
from vllm.lora.ops.torch_ops import lora_ops

from server.engine.grouped_lora_ops import GROUPED
from server.engine.vllm_fix import skip_no_lora_rows

HIDDEN, OUT = 576, 1536


def median_ms(op, args: tuple, repeat: int) -> float:
    op(*args)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        op(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rows, data = [], {}
    for tokens in (32, 512):
        indices = torch.randint(-1, args.slots, (tokens,), generator=generator)
        cases = {
            "bgmv_shrink": (torch.randn(tokens, HIDDEN), torch.randn(args.slots, 1, args.rank, HIDDEN),
                            torch.zeros(tokens, args.rank), indices, 1.0),
            "bgmv_expand": (torch.randn(tokens, args.rank), torch.randn(args.slots, 1, OUT, args.rank),
                            torch.zeros(tokens, OUT), indices, True),
        }
        for name, call in cases.items():
            vllm_op = skip_no_lora_rows(getattr(getattr(lora_ops, name), "__wrapped__", getattr(lora_ops, name)))
            theirs = median_ms(vllm_op, call, args.repeat)
            ours = median_ms(GROUPED[name](vllm_op), call, args.repeat)
            data[f"{name}-{tokens}"] = {"vllm_ms": theirs, "grouped_ms": ours}
            rows.append([f"{name}, {tokens} tokens", f"{theirs:.3f}", f"{ours:.3f}", f"{theirs / ours:.1f}"])
    print_table(f"One CPU LoRA op, one thread: {args.slots} slots, rank {args.rank}, {HIDDEN} -> {OUT}, median of "
                f"{args.repeat} (ms)", ["op", "vLLM's ms", "grouped ms", "vLLM / grouped"], rows, data)


if __name__ == "__main__":
    main()
