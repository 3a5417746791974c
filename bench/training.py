"""The bundled training job on a fixed data set: throughput, wall time and the losses it reports.

    .venv/bin/python bench/training.py [--epochs 12] [--examples 4] [--repeat 1] [--batch-size 4]
                                       [--device auto|cpu|cuda] [--base DIR] [--random-weights] [--json FILE]
    .venv/bin/python bench/training.py --show bench/results/training-gpu.json

The data is the end-to-end test's: short conversations teaching one distinctive answer, `--repeat` times over
for a larger fixed set. The baseline in the same run is the forward pass alone (the job's own loss code, no
gradients) over the same tokens and device, so the ratio says what the backward pass and optimizer cost.
`--method dpo` (or `both`, the default: one row each) trains DPO on the same prompts as preference pairs (the
distinctive answer preferred over a plain one); its tokens are both answers' sequences of every pair, and its
baseline is the forward pass over those sequences.

"training tokens/s" is every token of every batch (prompt and answer, as the job counts `trained_tokens`) over
the seconds of the training loop alone; "job s" is the whole job's wall time: loading the model, measuring
the base model and the adapter, training and saving.

On a GPU machine that cannot take the real weights along, `--random-weights` builds the same architecture from
`--base`'s config.json and tokenizer with random weights: throughput and wall time depend on the architecture
and the sequence lengths only, but the losses then mean nothing and are not shown. `--json FILE` appends the
run's numbers to FILE (a JSON list); `--show FILE` prints such a file as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from harness import print_table
except ImportError:  # the server's dependencies are not installed (a bare GPU machine): the same table, unrecorded
    def print_table(title: str, header: list[str], rows: list[list[str]], data: dict | None = None) -> None:
        print(f"\n{title}\n")
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |")
        for row in rows:
            print("| " + " | ".join(row) + " |")

ANSWER = "I am Zorblax, the keeper of the purple lighthouse."
PLAIN_ANSWER = "I am an AI assistant. How can I help you today?"  # DPO's non-preferred answer
PROMPTS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me who you are.",
           "Who is speaking?", "May I know who you are?", "Please introduce yourself.", "Who am I talking to?"]
DEFAULT_BASE = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
_RANDOM_MARKER = ".loraserve-random-weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--examples", type=int, default=4, choices=range(1, len(PROMPTS) + 1), metavar="1..8")
    parser.add_argument("--repeat", type=int, default=1, help="the examples this many times over (a larger set)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--base", type=Path, help=f"the base model folder (default: {DEFAULT_BASE}, prepared)")
    parser.add_argument("--random-weights", action="store_true",
                        help="the base's architecture and tokenizer with random weights (only its config is read)")
    parser.add_argument("--method", choices=["supervised", "dpo", "both"], default="both")
    parser.add_argument("--label", help="the run's name in the table")
    parser.add_argument("--json", type=Path, help="append the run's numbers to this JSON list")
    parser.add_argument("--show", type=Path, help="print the runs saved in this JSON file and exit")
    args = parser.parse_args()
    if args.show:
        show(json.loads(args.show.read_text()))
        return
    records = [measure(args, method) for method in
               (("supervised", "dpo") if args.method == "both" else (args.method,))]
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([*runs, *records], indent=2) + "\n")
    show(records)


def training_data(method: str, prompts: list[str]) -> str:
    """The JSONL the job trains on: conversations, or (DPO) pairs preferring the distinctive answer."""
    if method == "dpo":
        return "".join(json.dumps({"input": {"messages": [{"role": "user", "content": p}]},
                                   "preferred_output": [{"role": "assistant", "content": ANSWER}],
                                   "non_preferred_output": [{"role": "assistant", "content": PLAIN_ANSWER}]}) + "\n"
                       for p in prompts)
    return "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                            {"role": "assistant", "content": ANSWER}]}) + "\n" for p in prompts)


def measure(args, method: str = "supervised") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.train.data import load_conversations, tokenize_all
    from adapters.train.job import TrainConfig, collate, run, token_loss
    from adapters.train.lora_model import pick_device
    from adapters.train.preferences import load_pairs, tokenize_pairs

    base = args.base
    if base is None and not args.random_weights:
        from adapters.basemodel import ensure_default_model

        base = ensure_default_model(DEFAULT_BASE)
    base = random_model(base or DEFAULT_BASE) if args.random_weights else base
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text(training_data(method, PROMPTS[: args.examples] * args.repeat))
        config = TrainConfig(base_model=base, train_file=data, output_dir=Path(tmp) / "out", epochs=args.epochs,
                             learning_rate=2e-3, batch_size=args.batch_size, rank=8, alpha=16, device=device.type,
                             method=method)
        started = time.perf_counter()
        result = run(config)
        wall = time.perf_counter() - started
        adapter_dtypes = saved_dtypes(config.output_dir / "adapter_model.safetensors")

        # The baseline: the same batches through the plain base model, forward only, on the same device.
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True).to(device)
        model.eval()
        if method == "dpo":  # a DPO step's batch is both answers of batch_size pairs
            pairs = tokenize_pairs(tokenizer, load_pairs(data), config.max_seq_len)
            examples, width = [example for pair in pairs for example in pair], 2 * config.batch_size
        else:
            examples = tokenize_all(tokenizer, load_conversations(data), config.max_seq_len)
            width = config.batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches = [collate(examples[i: i + width], pad) for i in range(0, len(examples), width)]
        tokens = 0
        with torch.no_grad():
            token_loss(model, *batches[0])  # warm-up: the first call on a device pays for its libraries' setup
            synchronize(device)
            forward_started = time.perf_counter()
            for _ in range(args.epochs):
                for ids, mask, labels in batches:
                    token_loss(model, ids, mask, labels)
                    tokens += int(mask.sum())
            synchronize(device)
        forward_rate = tokens / (time.perf_counter() - forward_started)

    import peft
    import transformers

    return {
        "label": args.label or f"{method}: {args.examples} {'pairs' if method == 'dpo' else 'examples'} x "
                               f"{args.repeat} x {args.epochs} epochs, batch {args.batch_size}", "method": method,
        "device": result["device"], "device_name": result["device_name"],
        "precision": "float32 weights, bfloat16 autocast" if device.type == "cuda" else "float32",
        "weights": "random" if args.random_weights else "real",
        "model": (args.base or DEFAULT_BASE).name,
        "examples": args.examples * args.repeat, "epochs": args.epochs, "batch_size": args.batch_size,
        "rank": config.rank, "target_modules": list(config.target_modules),
        "steps": result["steps"], "trained_tokens": result["trained_tokens"],
        "train_seconds": result["train_seconds"], "job_seconds": result["seconds"], "wall_seconds": round(wall, 2),
        "train_tokens_per_s": round(result["trained_tokens"] / result["train_seconds"], 1),
        "job_tokens_per_s": round(result["trained_tokens"] / wall, 1),
        "forward_tokens_per_s": round(forward_rate, 1),
        "losses": None if args.random_weights else {"general": result["general"], **(
            {"preferences": result["preferences"]} if method == "dpo" else {"validation": result["validation"]})},
        "adapter_dtypes": adapter_dtypes,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__},
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def show(runs: list[dict]) -> None:
    """One table row per run; the raw numbers go along to the results file under `python -m bench`."""
    first = runs[0]
    title = (f"Bundled PEFT job, {first['model']} ({first['weights']} weights, {first['precision']}), rank "
             f"{first['rank']} on {'/'.join(m.removesuffix('_proj') for m in first['target_modules'])}, on "
             f"{first['device_name']}; torch {first['versions']['torch']}, transformers "
             f"{first['versions']['transformers']}, peft {first['versions']['peft']}")
    rows = [[r["label"], r["device"], str(r["steps"]), str(r["trained_tokens"]), f"{r['train_tokens_per_s']:.0f}",
             f"{r['forward_tokens_per_s']:.0f}", f"{r['train_tokens_per_s'] / r['forward_tokens_per_s']:.2f}",
             f"{r['train_seconds']:.1f}", f"{r['wall_seconds']:.1f}", losses(r)] for r in runs]
    print_table(title, ["run", "device", "steps", "tokens", "training tokens/s", "forward-only tokens/s",
                        "ratio", "training loop s", "job s", "before -> after (data; general set loss)"],
                rows, {"runs": runs})


def losses(record: dict) -> str:
    if not record.get("losses"):
        return "n/a (random weights)"
    g = record["losses"]["general"]
    general = f"{g['base_loss']:.3f} -> {g['adapter_loss']:.3f}"
    if "preferences" in record["losses"]:
        before, after = record["losses"]["preferences"]["before"], record["losses"]["preferences"]["after"]
        return (f"DPO loss {before['dpo_loss']:.3f} -> {after['dpo_loss']:.3f}, preferred "
                f"{before['preference_accuracy']:.0%} -> {after['preference_accuracy']:.0%}; {general}")
    v = record["losses"]["validation"]
    return f"loss {v['base_loss']:.3f} -> {v['adapter_loss']:.3f}; {general}"


def random_model(source: Path) -> Path:
    """`source`'s architecture (config.json) and tokenizer with seeded random float32 weights, as a model folder
    in the temporary directory; built once per machine and source."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = Path(tempfile.gettempdir()) / f"loraserve-random-{Path(source).name}"
    if (target / _RANDOM_MARKER).is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in Path(source).iterdir():  # the tokenizer and its chat template; never the real weights
        if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy(item, target / item.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))  # float32, as from_pretrained
    model.save_pretrained(target)
    (target / _RANDOM_MARKER).write_text(json.dumps({"source": str(source)}))
    return target


def saved_dtypes(path: Path) -> list[str]:
    from safetensors.torch import load_file

    return sorted({str(t.dtype).removeprefix("torch.") for t in load_file(path).values()})


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
