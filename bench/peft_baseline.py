"""Hugging Face PEFT serving one adapter at a time: the baseline of the S-LoRA paper, for many_adapters.py.

One process, float32, 2 torch threads: the base model with adapters loaded into one PeftModel (as many as
the row needs, all before its clock starts). Every request of a row arrives at t=0 and is served in arrival
order: a batch is a run of consecutive requests for the same adapter (at most `concurrency`), then
`set_adapter` and a greedy `generate` of exactly `max_tokens` tokens. A request's time to first token is
from t=0 to the end of its batch's first decoding step (queueing included); tokens/s is all output tokens
over the row's wall time. The base row runs on the same PeftModel with its adapters disabled. One base and
one adapter request warm the process up first (untimed).

Run as a child process: a job as JSON on stdin ({"model", "folders", "prompts", "concurrency", "max_tokens",
"threads", "rows": [{"label", "adapters", "sequence"}]}), results as JSON on stdout, progress on stderr.
Start it with OMP_WAIT_POLICY=PASSIVE (many_adapters.py does): with OpenMP's default spin-waiting, two torch
threads on a 2-core machine that anything else is using slow generation down ten-fold and more.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList


class FirstStep(StoppingCriteria):
    """Records when the first token of the batch exists; never stops generation."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def batches(sequence: list[tuple[int | None, int]], concurrency: int) -> list[list[int]]:
    """Indices of the requests in each batch: runs of consecutive requests for one adapter."""
    out: list[list[int]] = []
    for i, (adapter, _) in enumerate(sequence):
        if out and sequence[out[-1][0]][0] == adapter and len(out[-1]) < concurrency:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class PeftServer:
    def __init__(self, model_path: Path, threads: int = 2):
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.model: PeftModel | None = None
        self.loaded, self.load_s = 0, 0.0

    def load(self, folders: list[Path]) -> float:
        """Have adapters a0..a{len-1} loaded (adding those missing); the seconds all loads took so far."""
        started = time.perf_counter()
        for i in range(self.loaded, len(folders)):
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, folders[i], adapter_name=f"a{i}").eval()
            else:
                self.model.load_adapter(folders[i], adapter_name=f"a{i}")
        self.loaded = max(self.loaded, len(folders))
        self.load_s += time.perf_counter() - started
        return self.load_s

    def serve(self, sequence: list[tuple[int | None, int]], prompts: list[str], concurrency: int,
              max_tokens: int) -> dict:
        """Serve `sequence` ((adapter index or None for the base, prompt index) in arrival order)."""
        model = self.model
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
        ttft = [0.0] * len(sequence)
        tokens = 0
        started = time.perf_counter()
        for batch in batches(sequence, concurrency):
            adapter = sequence[batch[0]][0]
            if adapter is None:
                context = model.disable_adapter()
            else:
                model.set_adapter(f"a{adapter}")
                context = contextlib.nullcontext()
            inputs = self.tokenizer([texts[sequence[i][1]] for i in batch], return_tensors="pt", padding=True)
            first = FirstStep()
            with context, torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                     stopping_criteria=StoppingCriteriaList([first]))
            generated = out.shape[1] - inputs["input_ids"].shape[1]
            assert generated == max_tokens, f"PEFT generated {generated} tokens, not {max_tokens}"
            tokens += generated * len(batch)
            for i in batch:
                ttft[i] = first.at - started
        wall = time.perf_counter() - started
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": ttft,
                "batches": len(batches(sequence, concurrency))}


def main() -> None:
    job = json.load(sys.stdin)
    server = PeftServer(Path(job["model"]), job["threads"])
    folders = [Path(f) for f in job["folders"]]
    server.load(folders[:1])
    server.serve([(None, 0), (0, 0)], job["prompts"], job["concurrency"], job["max_tokens"])  # warm-up, untimed
    results = {}
    for row in job["rows"]:  # in order of adapters, so each load only adds the new ones
        load_s = server.load(folders[:max(row["adapters"], 1)])
        sequence = [(a, p) for a, p in row["sequence"]]
        results[row["label"]] = {**server.serve(sequence, job["prompts"], job["concurrency"], job["max_tokens"]),
                                 "load_s": load_s}
        print(f"peft {row['label']}: {results[row['label']]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
