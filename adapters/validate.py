"""Every check on an adapter folder before it may enter the registry.

An adapter is untrusted input. Nothing here imports torch or unpickles anything: the config is JSON and
a safetensors file is a JSON header followed by raw bytes, so both are read as data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Files a stock PEFT `save_pretrained` writes beside the adapter that are harmless and not kept.
IGNORED_FILES = {"README.md", ".gitattributes"}
# Formats that execute code when loaded (pickle) or are code; refused even beside a safetensors file.
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so", ".sh", ".npy", ".npz"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100 * 1024 * 1024


class AdapterInvalid(ValueError):
    """The adapter is refused; the message names the problem for the uploader."""


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter is checked against: the served base model's identity and its linear layers."""

    model_id: str
    served_name: str
    path: Path
    max_rank: int

    def accepts_base(self, name: str | None) -> bool:
        if not name:
            return True  # PEFT leaves it empty for models built in memory
        candidates = {self.model_id, self.served_name, str(self.path), str(self.path.resolve())}
        return name.rstrip("/") in candidates or Path(name).name in {self.path.name, self.model_id.split("/")[-1]}


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensor_count: int


def validate_adapter_dir(folder: Path, base: BaseModelSpec) -> AdapterInfo:
    """Check a folder holding an adapter; raise AdapterInvalid with a clear message if it is refused."""
    names = {p.name for p in folder.iterdir()}
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file():
            raise AdapterInvalid(f"'{entry.name}' is not a regular file; an adapter is flat regular files.")
        if entry.suffix.lower() in UNSAFE_SUFFIXES:
            raise AdapterInvalid(
                f"'{entry.name}' is a pickle or code file; only safetensors weights are accepted."
            )
    unexpected = names - set(ADAPTER_FILES) - IGNORED_FILES
    if unexpected:
        raise AdapterInvalid(f"Unexpected files {sorted(unexpected)}; an adapter is {list(ADAPTER_FILES)}.")
    for required in ADAPTER_FILES:
        if required not in names:
            raise AdapterInvalid(f"'{required}' is missing; upload a PEFT LoRA adapter saved with safetensors.")
    config = _read_config(folder / CONFIG_FILE, base)
    tensors = read_safetensors_header(folder / WEIGHTS_FILE)
    _check_tensors(tensors, config.rank)
    return AdapterInfo(config.rank, config.alpha, config.target_modules, len(tensors))


def _read_config(path: Path, base: BaseModelSpec) -> AdapterInfo:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterInvalid(f"{CONFIG_FILE} is not valid JSON.") from exc
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} must be a JSON object.")
    if config.get("peft_type") != "LORA":
        raise AdapterInvalid(f"Only LoRA adapters are served; peft_type is {config.get('peft_type')!r}.")
    if "auto_map" in config:
        raise AdapterInvalid(f"{CONFIG_FILE} has 'auto_map', which would load custom code; remove it.")
    if not base.accepts_base(config.get("base_model_name_or_path")):
        raise AdapterInvalid(
            f"The adapter was made for '{config.get('base_model_name_or_path')}', but this server serves "
            f"'{base.model_id}'."
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterInvalid(f"The LoRA rank 'r' must be a positive integer, not {rank!r}.")
    if rank > base.max_rank:
        raise AdapterInvalid(f"The LoRA rank {rank} is above this server's maximum of {base.max_rank}.")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterInvalid(f"'lora_alpha' must be a number, not {alpha!r}.")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterInvalid("'target_modules' must name the modules the adapter changes.")
    return AdapterInfo(rank, float(alpha), tuple(targets), 0)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors' names, dtypes and shapes, read without loading any weights; checks the file is whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AdapterInvalid(f"{path.name} is truncated.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise AdapterInvalid(f"{path.name} is not a safetensors file or is truncated.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterInvalid(f"{path.name} has a corrupt header.") from exc
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{path.name} has a corrupt header.")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            shape = info["shape"]
            if not isinstance(info["dtype"], str):
                raise TypeError
        except (TypeError, KeyError, ValueError) as exc:
            raise AdapterInvalid(f"{path.name}: the entry for '{name}' is corrupt.") from exc
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= data_len):
            raise AdapterInvalid(f"{path.name} is truncated or corrupt at tensor '{name}'.")
        end = max(end, stop)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterInvalid(f"{path.name}: tensor '{name}' has a corrupt shape.")
    if end != data_len:
        raise AdapterInvalid(f"{path.name} is truncated or has trailing bytes.")
    return header


def _check_tensors(tensors: dict[str, dict], rank: int) -> None:
    if not tensors:
        raise AdapterInvalid(f"{WEIGHTS_FILE} holds no tensors.")
    for name, info in tensors.items():
        if info["dtype"] not in FLOAT_DTYPES:
            raise AdapterInvalid(f"Tensor '{name}' has dtype {info['dtype']}; LoRA weights must be floats.")
        if ".lora_A." not in name and ".lora_B." not in name:
            raise AdapterInvalid(f"Tensor '{name}' is not a LoRA A or B matrix.")
        shape = info["shape"]
        if len(shape) != 2:
            raise AdapterInvalid(f"Tensor '{name}' must be 2-dimensional, not {shape}.")
        lora_dim = shape[0] if ".lora_A." in name else shape[1]
        if lora_dim != rank:
            raise AdapterInvalid(f"Tensor '{name}' has shape {shape}, which does not match rank {rank}.")
