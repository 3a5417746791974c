"""The model a training job trains: the base model with LoRA matrices, on the right device, saved as PEFT does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

MAX_GRAD_NORM = 1.0  # clipping keeps one odd batch from wrecking a small adapter

if TYPE_CHECKING:
    from adapters.train.job import TrainConfig


def pick_device(name: str = "auto") -> torch.device:
    """The GPU when there is one (or when asked for: then its absence is an error), else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def load_model(config: TrainConfig, tokenizer, device: torch.device, emit: Callable) -> tuple[object, int]:
    """The base model in float32, wrapped with fresh LoRA matrices (B starts at zero, A at random, drawn on the CPU
    so that the same seed gives the same start on any device) or with `init_adapter`'s; and the padding token id.
    On a GPU the weights stay float32 and the matrix work runs under bfloat16 autocast (`scored_loss`): the saved
    adapter is float32 either way. Messages name no file path: they are shown to the tenant whose job this is."""
    emit("loading", f"Loading the base model (training on {device_name(device)})",
         device=device.type, device_name=device_name(device))
    model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32, local_files_only=True)
    torch.manual_seed(config.seed)
    if config.init_adapter:  # continued training: the saved adapter's matrices, rank and targets, trainable
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True).to(device)
    else:
        model = get_peft_model(model, LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
            target_modules=list(config.target_modules), use_rslora=config.use_rslora, task_type="CAUSAL_LM")).to(device)
    return model, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def save_checkpoint(model, config: TrainConfig, epoch: int, step: int) -> str | None:
    """The epoch's adapter under `checkpoint_dir/step-N` if it is one of the last `keep_checkpoints` but the final
    (saved as the output); its folder name, or None."""
    if not config.checkpoint_dir or not config.epochs - config.keep_checkpoints < epoch < config.epochs:
        return None
    saved = f"step-{step}"
    model.save_pretrained(config.checkpoint_dir / saved)
    (config.checkpoint_dir / saved / "README.md").unlink(missing_ok=True)
    return saved


def save_adapter(model, config: TrainConfig) -> None:
    """adapter_config.json + adapter_model.safetensors, naming the base model folder it was made for."""
    model.save_pretrained(config.output_dir)
    (config.output_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card template; not kept


class LoraOptimizer:
    """AdamW over the LoRA matrices only, a short linear warmup, then a constant learning rate; gradients clipped."""

    def __init__(self, model, config: TrainConfig, total_steps: int) -> None:
        warmup = max(1, total_steps // 10)
        self.optimizer = torch.optim.AdamW(param_groups(model, config), weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def step(self, loss: torch.Tensor, number: int) -> None:
        """One update from `loss` (step `number`, for the message when the loss is not finite)."""
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged: the loss is {loss.item()} at step {number}; "
                               "lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()


def param_groups(model, config: TrainConfig) -> list[dict]:
    """The trainable LoRA matrices: A at the learning rate, B at `loraplus_lr_ratio` times it (LoRA+) if given."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "lora_B" not in n], "lr": config.learning_rate},
            {"params": [p for n, p in named if "lora_B" in n],
             "lr": config.learning_rate * (config.loraplus_lr_ratio or 1.0)}]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
