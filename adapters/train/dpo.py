"""DPO: an adapter trained on preference pairs (Rafailov et al., 2023), OpenAI's `method={"type": "dpo"}`.

The loss of a pair is -log sigmoid(beta * ((chosen - chosen_ref) - (rejected - rejected_ref))), where each term is
an answer's summed log-probability given its prompt, under the adapter being trained or under the reference model.
The reference is the model as training starts: the base model (fresh LoRA matrices add nothing, their B being zero)
or, when training continues an adapter, that adapter. It never changes, so its log-probabilities are computed once
before the first step, and no second model is held in memory.

This is the bundled loop of `adapters.train.job` (same data checks, model, optimizer, checkpoints, events and
outputs) with another loss, rather than TRL's DPOTrainer: TRL would add datasets, accelerate and its own trainer's
configuration to the training image for ~60 lines of loss and bookkeeping, and take away the events the job API
shows step by step.

Measured before and after on held-out pairs (the validation file, else the training pairs): the DPO loss, the
preference accuracy (the share of pairs whose preferred answer the model gives more probability than the other)
and the mean log-probability margin (preferred minus non-preferred; above zero: the model prefers it), and the
reward margin (beta times that margin's change from the reference, DPO's implicit reward). And the general set's
loss of the base model and of the adapter, as for supervised training: a rise is forgetting.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from adapters.train.data import GENERAL_SET, IGNORE, load_conversations, tokenize_all
from adapters.train.job import Cancelled, NoImprovement, TrainConfig, collate, evaluate
from adapters.train.lora_model import LoraOptimizer, device_name, load_model, save_adapter, save_checkpoint
from adapters.train.preferences import load_pairs, tokenize_pairs


def train_dpo(config: TrainConfig, emit: Callable, device: torch.device, should_stop: Callable[[], bool],
              started: float) -> dict:
    """`adapters.train.job.run` for `method="dpo"`: the same steps, on preference pairs."""
    # 1. The pairs, checked in full before anything heavy.
    tokenizer = AutoTokenizer.from_pretrained(config.base_model, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError("the base model has no chat template to render conversations with")
    train = tokenize_pairs(tokenizer, load_pairs(config.train_file, role="training file"), config.max_seq_len)
    split, held_out = "training", train
    if config.validation_file:
        split = "validation"
        held_out = tokenize_pairs(tokenizer, load_pairs(config.validation_file, role="validation file"),
                                  config.max_seq_len, "validation file")
    general = tokenize_all(tokenizer, load_conversations(GENERAL_SET, role="general set"), 32768, "general set")
    emit("validating", f"Training file: {len(train)} preference pairs; " + (
        f"validation file: {len(held_out)} pairs" if split == "validation" else
        "no validation file, so the adapter is measured on the training pairs"),
         train={"pairs": len(train)}, validation={"pairs": len(held_out)} if split == "validation" else None,
         split=split)

    # 2. The model, and the reference's log-probabilities: the model as it is before the first step.
    model, pad_id = load_model(config, tokenizer, device, emit)
    train_reference = answer_logprobs(model, train, config.batch_size, pad_id, should_stop)
    held_out_reference = train_reference if held_out is train else answer_logprobs(
        model, held_out, config.batch_size, pad_id, should_stop)
    before = preference_metrics(held_out_reference, held_out_reference, config.beta)
    with model.disable_adapter():  # forgetting is measured against the base model, as in supervised training
        base_general = evaluate(model, general, config.batch_size, pad_id, should_stop)
    emit("eval", f"Before training: prefers the preferred answer on {before['preference_accuracy']:.0%} of the "
         f"{split} pairs (log-probability margin {before['logprob_margin']:+.3f})", stage="before", split=split,
         general_loss=base_general, **before)

    # 3. Train: the same optimizer and schedule as supervised training, DPO's loss.
    total_steps = math.ceil(len(train) / config.batch_size) * config.epochs
    optimizer = LoraOptimizer(model, config, total_steps)
    rng, order = random.Random(config.seed), list(range(len(train)))
    step = trained_tokens = 0
    train_started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(order)
        model.train()
        epoch_loss = epoch_right = 0.0
        for start in range(0, len(order), config.batch_size):
            if should_stop():
                raise Cancelled(f"cancelled after {step} of {total_steps} steps")
            picked = order[start:start + config.batch_size]
            logps = pair_logprobs(model, [train[i] for i in picked], pad_id)
            losses, right = dpo_loss(logps, train_reference[picked], config.beta)
            loss = losses.mean()
            optimizer.step(loss, step + 1)
            step += 1
            trained_tokens += sum(len(ids) for i in picked for ids, _ in train[i])
            epoch_loss, epoch_right = epoch_loss + losses.sum().item(), epoch_right + right
            emit("step", f"Step {step}/{total_steps} (epoch {epoch}): loss {loss.item():.4f}", step=step,
                 total_steps=total_steps, epoch=epoch, loss=loss.item(), accuracy=right / len(picked),
                 trained_tokens=trained_tokens)
        metrics = {"step": step, "train_loss": epoch_loss / len(train),
                   "train_mean_reward_accuracy": epoch_right / len(train)}
        if split == "validation":
            now = preference_metrics(answer_logprobs(model, held_out, config.batch_size, pad_id, should_stop),
                                     held_out_reference, config.beta)
            metrics |= {"valid_loss": now["dpo_loss"], "valid_preference_accuracy": now["preference_accuracy"],
                        "valid_reward_margin": now["reward_margin"]}
        emit("checkpoint", f"Epoch {epoch}: loss {metrics['train_loss']:.4f}", epoch=epoch, step=step,
             metrics=metrics, saved=save_checkpoint(model, config, epoch, step))
    train_seconds = time.monotonic() - train_started

    # 4. The adapter on the same pairs, and on the general set.
    after = preference_metrics(answer_logprobs(model, held_out, config.batch_size, pad_id, should_stop),
                               held_out_reference, config.beta)
    adapter_general = evaluate(model, general, config.batch_size, pad_id, should_stop)
    forgetting = "; the general set's loss rose: some general ability is lost" if adapter_general > base_general else ""
    emit("eval", f"Adapter: prefers the preferred answer on {after['preference_accuracy']:.0%} of the {split} pairs "
         f"(before {before['preference_accuracy']:.0%}), log-probability margin {after['logprob_margin']:+.3f} "
         f"(before {before['logprob_margin']:+.3f}), reward margin {after['reward_margin']:+.3f}{forgetting}",
         stage="after", split=split, general_loss=adapter_general, **after)
    if config.require_improvement and not after["dpo_loss"] < before["dpo_loss"]:
        raise NoImprovement(f"The adapter's DPO loss on the {split} pairs is {after['dpo_loss']:.4f}, not lower than "
                            f"the reference model's {before['dpo_loss']:.4f}; nothing was saved. Try more pairs, "
                            "epochs, another learning rate or beta.")
    if not math.isfinite(after["dpo_loss"]):
        raise RuntimeError("training diverged: the adapter's loss is not finite; lower the learning rate")

    # 5. Save, as supervised training does.
    save_adapter(model, config)
    result = {"method": "dpo", "beta": config.beta, "trained_tokens": trained_tokens, "steps": step,
              "train_loss": epoch_loss / len(train),
              "preferences": {"split": split, "before": before, "after": after},
              "general": {"base_loss": base_general, "adapter_loss": adapter_general},
              "seconds": round(time.monotonic() - started, 2), "train_seconds": round(train_seconds, 3),
              "device": device.type, "device_name": device_name(device)}
    emit("done", f"Adapter saved after {step} steps in {result['seconds']:.0f} s", **result)
    return result


def pair_logprobs(model, pairs: list[tuple], pad_id: int) -> torch.Tensor:
    """(pairs, 2): each pair's preferred and non-preferred answer's summed log-probability given its prompt, both
    answers of every pair in one batch."""
    examples = [example for pair in pairs for example in pair]
    return sequence_logprobs(model, *collate(examples, pad_id)).view(len(pairs), 2)


def sequence_logprobs(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Each row's summed log-probability of its labelled (answer) tokens. On a GPU under bfloat16 autocast, the
    log-softmax in float32, as `adapters.train.job.scored_loss`."""
    device = next(model.parameters()).device
    targets = labels[:, 1:].to(device)  # position t predicts token t + 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with precision:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    learned = targets != IGNORE
    picked = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, targets.clamp(min=0).unsqueeze(-1))
    return (picked.squeeze(-1) * learned).sum(dim=1)


@torch.no_grad()
def answer_logprobs(model, pairs: list[tuple], batch_size: int, pad_id: int,
                    should_stop: Callable[[], bool]) -> torch.Tensor:
    """(pairs, 2) log-probabilities of every pair's two answers under the model as it is, on the CPU."""
    model.eval()
    parts = []
    for start in range(0, len(pairs), batch_size):
        if should_stop():
            raise Cancelled("cancelled while measuring the model")
        parts.append(pair_logprobs(model, pairs[start:start + batch_size], pad_id).cpu())
    return torch.cat(parts)


def dpo_loss(logps: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, int]:
    """Each pair's DPO loss, and how many pairs' implicit reward ranks the preferred answer first."""
    rewards = beta * (logps - reference.to(logps.device))  # (pairs, 2): preferred, non-preferred
    margin = rewards[:, 0] - rewards[:, 1]
    return -F.logsigmoid(margin), int((margin > 0).sum())


def preference_metrics(logps: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """The held-out figures of the module docstring, for the model whose log-probabilities are `logps`."""
    losses, _ = dpo_loss(logps, reference, beta)
    rewards = beta * (logps - reference)
    return {"dpo_loss": losses.mean().item(), "preference_accuracy": (logps[:, 0] > logps[:, 1]).float().mean().item(),
            "logprob_margin": (logps[:, 0] - logps[:, 1]).mean().item(),
            "reward_margin": (rewards[:, 0] - rewards[:, 1]).mean().item(), "pairs": len(logps)}

