"""An all-zero LoRA adapter for the base model, through which base-model requests are served.

vLLM's CPU LoRA kernels (`vllm/lora/ops/torch_ops`) pick each row's adapter with `weights[index]`, and
a base-model row's index is -1: in a batch that also holds adapter requests, a base-model request gets
the adapter in the LAST slot applied to it (vllm-project/vllm#48421, open at vLLM 0.32). Giving base
requests an adapter of their own whose weights are all zero makes their rows add exactly nothing, on
every engine, whatever its kernels do. One q_proj of rank 1 is enough: the engine zeroes a slot's other
modules when it activates an adapter that lacks them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from adapters.validate import BaseModelSpec, validate_adapter_dir

ENGINE_NAME = "_base--zero--v0"  # tenants' names cannot start with "_", so no engine name collides


def ensure_zero_adapter(folder: Path, base: BaseModelSpec) -> Path:
    """Write the zero adapter into `folder` (atomically) unless a valid one is there; return `folder`."""
    try:
        validate_adapter_dir(folder, base)
        return folder
    except (OSError, ValueError):
        pass
    module, (out_features, in_features) = _target(base)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".zero-", dir=folder.parent))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.model_id, "r": 1,
        "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none", "target_modules": [module.rpartition(".")[2]],
    }
    (work / "adapter_config.json").write_text(json.dumps(config, indent=1))
    prefix = f"base_model.model.{module}"
    _write_zero_safetensors(work / "adapter_model.safetensors", {
        f"{prefix}.lora_A.weight": [1, in_features], f"{prefix}.lora_B.weight": [out_features, 1],
    })
    validate_adapter_dir(work, base)
    if folder.exists():  # an invalid leftover
        shutil.rmtree(folder)
    try:
        os.rename(work, folder)
    except OSError:  # another gateway sharing this registry wrote it meanwhile
        shutil.rmtree(work, ignore_errors=True)
        validate_adapter_dir(folder, base)
    return folder


def _target(base: BaseModelSpec) -> tuple[str, tuple[int, int]]:
    shapes = base.linear_shapes
    attention = sorted(m for m in shapes if m.endswith(".q_proj"))
    module = attention[0] if attention else sorted(m for m in shapes if m.startswith("model.layers."))[0]
    return module, shapes[module]


def _write_zero_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A float32 safetensors file of zero tensors, written by hand (no torch or numpy in the gateway)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))
