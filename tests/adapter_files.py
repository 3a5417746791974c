"""Small adapter folders written byte by byte, for tests of validation and the registry (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN = 576  # SmolLM2-135M
KV_DIM = 192  # 3 key/value heads x 64


def write_adapter(folder: Path, *, rank: int = 4, layers: int = 2, config: dict | None = None,
                  dtype=np.float32) -> Path:
    """A LoRA adapter on q_proj and v_proj of the first `layers` layers, shaped for SmolLM2-135M."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for module, out_dim in (("q_proj", HIDDEN), ("v_proj", KV_DIM)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.full((rank, HIDDEN), 0.01, dtype=dtype)
            tensors[f"{prefix}.lora_B.weight"] = np.full((out_dim, rank), 0.01, dtype=dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    base = {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    return folder
