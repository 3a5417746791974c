"""The bundled training job on a fixed data set: throughput, wall time and the losses it reports.

    .venv/bin/python bench/training.py [--epochs 12] [--examples 4]

The data is the end-to-end test's: short conversations teaching one distinctive answer. The baseline in
the same run is the forward pass alone (the job's own evaluation code, no gradients) over the same
tokens, so the ratio says what the backward pass and optimizer cost on this machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import REPO, print_table

from adapters.basemodel import ensure_default_model

ANSWER = "I am Zorblax, the keeper of the purple lighthouse."
PROMPTS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me who you are.",
           "Who is speaking?", "May I know who you are?", "Please introduce yourself.", "Who am I talking to?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--examples", type=int, default=4)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.train.data import load_conversations, tokenize_all
    from adapters.train.job import TrainConfig, collate, run, token_loss

    base = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": ANSWER}]}) + "\n"
                                for p in PROMPTS[: args.examples]))
        config = TrainConfig(base_model=base, train_file=data, output_dir=Path(tmp) / "out", epochs=args.epochs,
                             learning_rate=2e-3, batch_size=4, rank=8, alpha=16)
        started = time.perf_counter()
        result = run(config)
        wall = time.perf_counter() - started

        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
        examples = tokenize_all(tokenizer, load_conversations(data), config.max_seq_len)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokens, forward_started = 0, time.perf_counter()
        with torch.no_grad():
            for _ in range(args.epochs):
                for i in range(0, len(examples), config.batch_size):
                    ids, mask, labels = collate(examples[i: i + config.batch_size], pad)
                    token_loss(model, ids, mask, labels)
                    tokens += int(mask.sum())
        forward_rate = tokens / (time.perf_counter() - forward_started)

    train_rate = result["trained_tokens"] / result["seconds"]
    print_table(f"Bundled PEFT job, SmolLM2-135M float32, {args.examples} examples x {args.epochs} epochs, "
                f"rank 8 on q/k/v/o, batch 4", ["measurement", "tokens/s", "ratio to forward only"],
                [["forward pass only (no gradients)", f"{forward_rate:.0f}", "1.00"],
                 ["training (forward, backward, AdamW)", f"{train_rate:.0f}", f"{train_rate / forward_rate:.2f}"]])
    v, g = result["validation"], result["general"]
    print(f"\nwall time of the job {wall:.1f} s ({result['steps']} steps, {result['trained_tokens']} tokens, "
          f"{result['seconds']:.1f} s inside the job); loss on {v['split']} data: base {v['base_loss']:.3f} -> "
          f"adapter {v['adapter_loss']:.3f}; general set: base {g['base_loss']:.3f} -> adapter {g['adapter_loss']:.3f}")


if __name__ == "__main__":
    main()
