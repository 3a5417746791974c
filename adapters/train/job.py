"""The training job: a LoRA adapter for the base model, trained with PEFT on a tenant's chat data.

Read it top to bottom, like nanoGPT's train.py: check the data, load the model, measure the base model,
train, measure the adapter, save. Progress is a stream of events `{"type", "message", "data"}` given to
`report`. Run as a program, `python -m adapters.train.job CONFIG.json` writes each event as one JSON line
on stdout, the last `{"type": "result", "data": {...}}` or `{"type": "error", "code", "message"}`, and exits
0 (done), 2 (the data is refused), 3 (no improvement) or 1 (anything else).
"""

from __future__ import annotations

import os

# The base model is a local folder and nothing is ever fetched from a model hub; set before transformers loads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import contextlib
import json
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from adapters.train.data import GENERAL_SET, IGNORE, DataError, load_conversations, tokenize_all
from adapters.train.lora_model import LoraOptimizer, device_name, load_model, pick_device, save_adapter, save_checkpoint


class Cancelled(Exception):
    """`should_stop` asked the job to stop; nothing was saved."""


class NoImprovement(Exception):
    """The adapter does not beat the base model on the validation data; nothing was saved."""


@dataclass(kw_only=True)
class TrainConfig:
    """One job's settings, checked on creation so that a bad request fails before any work is done."""

    base_model: Path
    train_file: Path
    validation_file: Path | None = None
    output_dir: Path
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 4
    max_seq_len: int = 1024
    seed: int = 0
    use_rslora: bool = False
    loraplus_lr_ratio: float | None = None  # LoRA+: the B matrices learn this many times faster than the A's
    require_improvement: bool = False
    init_adapter: Path | None = None  # continue training this saved adapter (its rank and targets win)
    checkpoint_dir: Path | None = None  # where the last epochs' adapters are saved, `step-N` each
    keep_checkpoints: int = 0  # how many of the last epochs have a checkpoint, the final one (output_dir) included
    threads: int | None = None
    method: str = "supervised"  # or "dpo": preference pairs (adapters/train/dpo.py)
    beta: float = 0.1  # DPO's: how far from the reference model the adapter may move (higher: less far)
    device: str = "auto"  # "cuda" when a GPU is there, else "cpu"; or either one, named

    def __post_init__(self):
        for name in ("base_model", "train_file", "validation_file", "output_dir", "init_adapter", "checkpoint_dir"):
            value = getattr(self, name)
            if not (value is None and name in ("validation_file", "init_adapter", "checkpoint_dir")):
                _check(name, value, isinstance(value, str | Path) and str(value) != "", "a path")
                setattr(self, name, Path(value))
        targets = self.target_modules
        _check("target_modules", targets, isinstance(targets, list | tuple) and len(targets) > 0
               and all(isinstance(t, str) and t for t in targets), "a non-empty list of module names")
        self.target_modules = tuple(targets)
        for name, (ok, need) in _RULES.items():
            _check(name, getattr(self, name), ok(getattr(self, name)), need)


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_RULES = {  # field: (test, what the value must be)
    "rank": (lambda v: _int_in(v, 1, 256), "a whole number from 1 to 256"),
    "epochs": (lambda v: _int_in(v, 1, 100), "a whole number from 1 to 100"),
    "keep_checkpoints": (lambda v: _int_in(v, 0, 100), "a whole number from 0 to 100"),
    "batch_size": (lambda v: _int_in(v, 1, 256), "a whole number from 1 to 256"),
    "max_seq_len": (lambda v: _int_in(v, 16, 32768), "a whole number from 16 to 32768"),
    "seed": (lambda v: _int_in(v, 0, 2**32 - 1), "a whole number from 0 to 2**32 - 1"),
    "threads": (lambda v: v is None or _int_in(v, 1, 1024), "null or a whole number from 1 to 1024"),
    "learning_rate": (lambda v: _real(v) and 0 < v <= 1, "a number above 0 and at most 1"),
    "dropout": (lambda v: _real(v) and 0 <= v < 1, "a number from 0 up to, not including, 1"),
    "alpha": (lambda v: _real(v) and 0 < v <= 4096, "a number above 0 and at most 4096"),
    "loraplus_lr_ratio": (lambda v: v is None or (_real(v) and 0 < v <= 1000), "null or a number above 0 up to 1000"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "require_improvement": (lambda v: isinstance(v, bool), "true or false"),
    "device": (lambda v: v in ("auto", "cpu", "cuda"), '"auto", "cpu" or "cuda"'),
    "method": (lambda v: v in ("supervised", "dpo"), '"supervised" or "dpo"'),
    "beta": (lambda v: _real(v) and 0 < v <= 2, "a number above 0 and at most 2"),
}


def _check(name: str, value, ok: bool, need: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {need}, not {value!r}")


def run(config: TrainConfig, report: Callable[[dict], None] = lambda e: None,
        should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train, measure and save one adapter; return its numbers. Raises DataError, NoImprovement, Cancelled."""
    started = time.monotonic()

    def emit(kind: str, message: str, **data) -> None:
        report({"type": kind, "message": message, "data": data})

    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    if config.output_dir.exists() and any(config.output_dir.iterdir()):
        raise ValueError("output_dir is not empty")
    if config.method == "dpo":
        from adapters.train.dpo import train_dpo

        return train_dpo(config, emit, device, should_stop, started)

    # 1. The data, checked in full before anything heavy: a bad file should fail in seconds.
    train_conversations = load_conversations(config.train_file, role="training file")
    validation_conversations = (load_conversations(config.validation_file, role="validation file")
                                if config.validation_file else None)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError("the base model has no chat template to render conversations with")
    train = tokenize_all(tokenizer, train_conversations, config.max_seq_len, "training file")
    split, validation = "training", train
    if validation_conversations:
        split = "validation"
        validation = tokenize_all(tokenizer, validation_conversations, config.max_seq_len, "validation file")
    general = tokenize_all(tokenizer, load_conversations(GENERAL_SET, role="general set"), 32768, "general set")
    counts = {"train": _count(train), "validation": _count(validation) if split == "validation" else None}
    emit("validating", f"Training file: {_describe(counts['train'])}; " + (
        f"validation file: {_describe(counts['validation'])}" if counts["validation"] else
        "no validation file, so the adapter is measured on the training set"), **counts, split=split)

    # 2. The base model with LoRA matrices (fresh, or the adapter training continues).
    model, pad_id = load_model(config, tokenizer, device, emit)

    # 3. The base model's loss, the yardstick: on the tenant's validation data and on general facts.
    with model.disable_adapter():
        base_loss = evaluate(model, validation, config.batch_size, pad_id, should_stop)
        base_general = evaluate(model, general, config.batch_size, pad_id, should_stop)
    emit("eval", f"Base model: loss {base_loss:.4f} on the {split} set, {base_general:.4f} on the general set",
         stage="before", split=split, validation_loss=base_loss, general_loss=base_general)

    # 4. Train: AdamW over the LoRA matrices only, a short linear warmup, then a constant learning rate.
    total_steps = math.ceil(len(train) / config.batch_size) * config.epochs
    optimizer = LoraOptimizer(model, config, total_steps)
    rng, order = random.Random(config.seed), list(range(len(train)))
    step = trained_tokens = 0
    train_started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(order)
        model.train()
        epoch_loss = epoch_count = epoch_hits = 0
        for start in range(0, len(order), config.batch_size):
            if should_stop():
                raise Cancelled(f"cancelled after {step} of {total_steps} steps")
            batch = collate([train[i] for i in order[start:start + config.batch_size]], pad_id)
            loss_sum, count, hits = scored_loss(model, *batch)
            loss = loss_sum / count
            optimizer.step(loss, step + 1)
            step += 1
            trained_tokens += int(batch[1].sum())
            epoch_loss, epoch_count, epoch_hits = epoch_loss + loss_sum.item(), epoch_count + count, epoch_hits + hits
            emit("step", f"Step {step}/{total_steps} (epoch {epoch}): loss {loss.item():.4f}", step=step,
                 total_steps=total_steps, epoch=epoch, loss=loss.item(), accuracy=hits / count,
                 trained_tokens=trained_tokens)
        # The epoch's checkpoint: its figures, and (for the last `keep_checkpoints` but the final) its adapter.
        metrics = {"step": step, "train_loss": epoch_loss / epoch_count,
                   "train_mean_token_accuracy": epoch_hits / epoch_count}
        if split == "validation":
            metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = measure(
                model, validation, config.batch_size, pad_id, should_stop)
        emit("checkpoint", f"Epoch {epoch}: loss {metrics['train_loss']:.4f}", epoch=epoch, step=step,
             metrics=metrics, saved=save_checkpoint(model, config, epoch, step))
    train_loss = epoch_loss / epoch_count
    train_seconds = time.monotonic() - train_started

    # 5. The adapter on the same data. A rise on the general set is forgetting: the tenant should see it.
    adapter_loss = evaluate(model, validation, config.batch_size, pad_id, should_stop)
    adapter_general = evaluate(model, general, config.batch_size, pad_id, should_stop)
    forgetting = "; the general set's loss rose: some general ability is lost" if adapter_general > base_general else ""
    emit("eval", f"Adapter: loss {adapter_loss:.4f} on the {split} set (base {base_loss:.4f}), "
         f"{adapter_general:.4f} on the general set (base {base_general:.4f}){forgetting}",
         stage="after", split=split, validation_loss=adapter_loss, general_loss=adapter_general)

    # 6. Refuse to hand back an adapter that is worse than none (`not <` also catches a NaN loss).
    if config.require_improvement and not adapter_loss < base_loss:
        raise NoImprovement(f"The adapter's loss on the {split} set is {adapter_loss:.4f}, not lower than the base "
                            f"model's {base_loss:.4f}; nothing was saved. Try more data, epochs or another learning "
                            "rate.")
    if not math.isfinite(adapter_loss):
        raise RuntimeError("training diverged: the adapter's loss is not finite; lower the learning rate")

    # 7. Save.
    save_adapter(model, config)

    result = {"trained_tokens": trained_tokens, "steps": step, "train_loss": train_loss,
              "validation": {"split": split, "base_loss": base_loss, "adapter_loss": adapter_loss},
              "general": {"base_loss": base_general, "adapter_loss": adapter_general},
              "seconds": round(time.monotonic() - started, 2), "train_seconds": round(train_seconds, 3),
              "device": device.type, "device_name": device_name(device)}
    emit("done", f"Adapter saved after {step} steps in {result['seconds']:.0f} s", **result)
    return result


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """`(input_ids, attention_mask, labels)`, right-padded to the longest example; padding is never learned."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in examples])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in examples])
    return input_ids, mask, labels


def token_loss(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy over the learned tokens, and how many there are (so means weigh every token)."""
    loss, count, _ = scored_loss(model, input_ids, attention_mask, labels)
    return loss, count


def scored_loss(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int, int]:
    """`token_loss`, and how many learned tokens the model predicts right (its token accuracy's numerator).

    The batch goes to the model's device. On a GPU the forward pass runs under bfloat16 autocast and the loss is
    taken in float32; on the CPU everything is float32, as before."""
    device = next(model.parameters()).device
    targets = labels[:, 1:]  # position t predicts token t + 1
    count = int((targets != IGNORE).sum())  # counted on the CPU: no wait for the GPU
    input_ids, attention_mask, targets = (t.to(device, non_blocking=True) for t in (input_ids, attention_mask, targets))
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with precision:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    hits = int(((logits.detach().argmax(-1) == targets) & (targets != IGNORE)).sum())
    return loss, count, hits


def evaluate(model, examples, batch_size: int, pad_id: int, should_stop: Callable[[], bool]) -> float:
    """The mean loss per learned (assistant) token over the examples."""
    return measure(model, examples, batch_size, pad_id, should_stop)[0]


@torch.no_grad()
def measure(model, examples, batch_size: int, pad_id: int, should_stop: Callable[[], bool]) -> tuple[float, float]:
    """The mean loss and the token accuracy over the examples' learned (assistant) tokens."""
    model.eval()
    total, count, hits = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        if should_stop():
            raise Cancelled("cancelled while measuring the model")
        loss_sum, n, right = scored_loss(model, *collate(examples[start:start + batch_size], pad_id))
        total, count, hits = total + loss_sum.item(), count + n, hits + right
    return total / count, hits / count


def _count(examples) -> dict:
    return {"examples": len(examples), "tokens": sum(len(ids) for ids, _ in examples),
            "learned_tokens": sum(sum(1 for t in labels if t != IGNORE) for _, labels in examples)}


def _describe(count: dict) -> str:
    return f"{count['examples']} examples, {count['tokens']} tokens ({count['learned_tokens']} to learn)"


def load_config(path: Path) -> TrainConfig:
    """A TrainConfig from a JSON object of its fields."""
    settings = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(settings, dict):
        raise ValueError("the job's config must be a JSON object of TrainConfig fields")
    try:
        return TrainConfig(**settings)
    except TypeError as exc:  # an unknown or missing field, named by the dataclass
        raise ValueError(f"bad job config: {exc}; the fields are {[f.name for f in fields(TrainConfig)]}") from None


def main(argv: list[str] | None = None) -> int:
    """The program: events as JSON lines on stdout, a traceback (if any) on stderr, the outcome as exit code."""
    args = sys.argv[1:] if argv is None else argv
    out = sys.stdout

    def emit(event: dict) -> None:
        out.write(json.dumps(_json_safe(event), default=str) + "\n")
        out.flush()  # the worker reads progress as it happens

    # Libraries that print would corrupt the JSON stream, so anything else written to stdout goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if len(args) != 1:
                raise ValueError("usage: python -m adapters.train.job CONFIG_JSON_PATH")
            result = run(load_config(Path(args[0])), emit)
        except DataError as exc:
            emit({"type": "error", "code": "invalid_training_file", "message": str(exc)})
            return 2
        except NoImprovement as exc:
            emit({"type": "error", "code": "no_improvement", "message": str(exc)})
            return 3
        except Exception as exc:
            traceback.print_exc()
            emit({"type": "error", "code": "training_failed", "message": f"{type(exc).__name__}: {exc}"})
            return 1
    emit({"type": "result", "data": result})
    return 0


def _json_safe(value):
    """JSON has no NaN or infinity (a diverged loss): they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
