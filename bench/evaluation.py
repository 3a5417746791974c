"""What evaluating an adapter version costs: the gateway's evaluation through the engine, against the training job's
own Python evaluation (PEFT) and against PEFT doing the engine's whole work, on one golden set, in one run.

    .venv/bin/python bench/evaluation.py [--examples 50] [--runs 2]

One gateway with its embedded engine; adapter `graded` with two versions (random rank-8 adapters on q/k/v/o) and a
golden set of --examples arithmetic questions with their answers. Timed:
- engine: `POST /v1/adapters/graded/versions/1/evaluate`, the whole report: on the golden set version 1, version 2
  (active, the one it would replace), the base model and the base model with 3 few-shot examples, each with the
  reference answers' loss and a greedy answer; on the general set (14 examples) the two versions and the base;
- PEFT, the job's evaluation: what a fine-tuning job measures itself (`adapters.train.job.evaluate`: loss only,
  the adapter and the base model, golden and general sets), in this process, batch 8;
- PEFT, the engine's work: the same models, losses and greedy answers as the engine's report (HF `generate`,
  batch 8, left-padded), in this process.
The gateway runs in a child process; the PEFT rows run here, after the engine's (one at a time: the machine's cores
are shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import ADMIN_KEY, BenchServer, make_adapters, print_table

from adapters.train.data import GENERAL_SET, IGNORE
from server.evaluation.evaluator import FEW_SHOT, MAX_NEW_TOKENS, few_shot_prompts, render
from server.evaluation.golden_set import Example, load_golden_set

BATCH = 8


def golden_lines(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i + 7}?"},
                          {"role": "assistant", "content": f"{i} + {i + 7} equals {2 * i + 7}."}]}
            for i in range(count)]


def upload_version(server: BenchServer, folder: Path) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    reply = httpx.post(f"{server.url}/admin/tenants/bench/adapters", data={"name": "graded"}, files=files,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
    reply.raise_for_status()


def engine_evaluation(server: BenchServer, runs: int) -> tuple[list[float], dict]:
    times, report = [], {}
    for _ in range(runs):
        started = time.perf_counter()
        reply = httpx.post(f"{server.url}/v1/adapters/graded/versions/1/evaluate", headers=server.auth, timeout=3600)
        times.append(time.perf_counter() - started)
        reply.raise_for_status()
        report = reply.json()
    return times, report


def peft_model(base_model: Path, folders: list[Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    model = PeftModel.from_pretrained(model, folders[0], adapter_name="v1")
    model.load_adapter(folders[1], adapter_name="v2")
    return tokenizer, model.eval()


def labelled(rendered) -> list[tuple[list[int], list[int]]]:
    out = []
    for r in rendered:
        labels = [IGNORE] * len(r.ids)
        for i in r.answer:
            labels[i] = r.ids[i]
        out.append((r.ids, labels))
    return out


def greedy(model, tokenizer, rendered) -> None:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rendered), BATCH):
        batch = rendered[start:start + BATCH]
        prompts = [r.ids[:r.start] for r in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = max(min(MAX_NEW_TOKENS, 2 * len(r.answer) + 16) for r in batch)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)


def using(model, adapter: str | None):
    """The model with one adapter, or (None) the base model."""
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def peft_rows(base_model: Path, folders: list[Path], golden: list[Example]) -> tuple[float, float]:
    from adapters.train.job import evaluate

    tokenizer, model = peft_model(base_model, folders)
    general = load_golden_set(GENERAL_SET, role="general set")
    sets = {"golden": render(tokenizer, golden), "general": render(tokenizer, general),
            "few_shot": render(tokenizer, golden, few_shot_prompts(golden))}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    never = lambda: False  # noqa: E731

    started = time.perf_counter()  # the job's own evaluation: loss of the adapter and the base model
    for adapter in ("v1", None):
        with using(model, adapter):
            for name in ("golden", "general"):
                evaluate(model, labelled(sets[name]), BATCH, pad, never)
    job_seconds = time.perf_counter() - started

    started = time.perf_counter()  # the engine's report: every model's loss and greedy answers
    plan = [("v1", "golden"), ("v2", "golden"), (None, "golden"), (None, "few_shot"),
            ("v1", "general"), ("v2", "general"), (None, "general")]
    for adapter, name in plan:
        with using(model, adapter):
            evaluate(model, labelled(sets[name]), BATCH, pad, never)
            greedy(model, tokenizer, sets[name])
    return job_seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with BenchServer() as server:
            model_dir = server.model
            folders = make_adapters(model_dir, Path(tmp), 2)
            for folder in folders:
                upload_version(server, folder)
            golden_file = Path(tmp) / "golden.jsonl"
            golden_file.write_text("".join(json.dumps(line) + "\n" for line in golden_lines(args.examples)))
            uploaded = httpx.post(f"{server.url}/v1/files", headers=server.auth, data={"purpose": "evals"},
                                  files={"file": ("golden.jsonl", golden_file.read_bytes())}, timeout=60)
            uploaded.raise_for_status()
            httpx.patch(f"{server.url}/v1/adapters/graded", headers=server.auth, timeout=600,
                        json={"golden_set": uploaded.json()["id"]}).raise_for_status()
            engine_times, report = engine_evaluation(server, args.runs)
        print(f"engine: {[round(t, 1) for t in engine_times]} s", flush=True)
        job_seconds, peft_seconds = peft_rows(model_dir, folders, load_golden_set(golden_file))
    engine = statistics.median(engine_times)
    rows = [
        ["engine, through the gateway (the report: 4 models on golden, 3 on general; loss and greedy answers)",
         f"{engine:.1f}", "1.00"],
        ["PEFT in Python, the job's own evaluation (loss only: adapter and base, golden and general)",
         f"{job_seconds:.1f}", f"{job_seconds / engine:.2f}"],
        ["PEFT in Python, the engine's whole work (same models, losses and greedy answers)",
         f"{peft_seconds:.1f}", f"{peft_seconds / engine:.2f}"],
    ]
    print_table(f"Evaluating one version on a {args.examples}-example golden set ({FEW_SHOT}-shot baseline; seconds)",
                ["evaluation", "seconds", "ratio to the engine"], rows,
                {"engine_seconds": [round(t, 2) for t in engine_times], "job_seconds": round(job_seconds, 2),
                 "peft_seconds": round(peft_seconds, 2), "report_seconds": report.get("seconds")})


if __name__ == "__main__":
    main()
