"""A stand-in for the SmolLM2-135M-Instruct base model folder, for tests that check adapters against it.

The safetensors files carry the real model's tensor names, dtypes and shapes for the first few layers.
Their data is all zeros and left as a hole in the file (a sparse file), so writing one costs neither
time nor disk; the files are still valid safetensors that any reader loads.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

HIDDEN = 576
KV_DIM = 192  # 3 key/value heads x 64
INTERMEDIATE = 1536
VOCAB = 49152


def base_shapes(layers: int = 2) -> dict[str, list[int]]:
    """Tensor names and shapes of SmolLM2-135M's first `layers` layers (its lm_head is tied, so absent)."""
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "model.norm.weight": [HIDDEN]}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": [HIDDEN], f"{p}.post_attention_layernorm.weight": [HIDDEN],
            f"{p}.self_attn.q_proj.weight": [HIDDEN, HIDDEN], f"{p}.self_attn.k_proj.weight": [KV_DIM, HIDDEN],
            f"{p}.self_attn.v_proj.weight": [KV_DIM, HIDDEN], f"{p}.self_attn.o_proj.weight": [HIDDEN, HIDDEN],
            f"{p}.mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN], f"{p}.mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
            f"{p}.mlp.down_proj.weight": [HIDDEN, INTERMEDIATE],
        }
    return shapes


def write_fake_base(folder: Path, *, layers: int = 2, shards: int = 1) -> Path:
    """A base model folder (config.json and `shards` safetensors files) shaped like SmolLM2-135M."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "vocab_size": VOCAB,
    }))
    names = list(base_shapes(layers).items())
    for shard in range(shards):
        header, offset = {}, 0
        for name, shape in names[shard::shards]:
            size = 4 * math.prod(shape)  # F32
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        filename = "model.safetensors" if shards == 1 else f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        with (folder / filename).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # zeros, as a hole
    return folder
