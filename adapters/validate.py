"""Every check on an adapter folder before it may enter the registry.

An adapter is untrusted input. Nothing here imports torch or unpickles anything: the config is JSON and
a safetensors file is a JSON header followed by raw bytes, so both are read as data. The adapter's tensors
are checked against the base model's real layers, read the same way from its safetensors headers.
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from adapters.basemodel import BaseModelError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Files a stock PEFT `save_pretrained` writes beside the adapter that are harmless and not kept.
IGNORED_FILES = {"README.md", ".gitattributes"}
# Formats that execute code when loaded (pickle) or are code; refused even beside a safetensors file.
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so", ".sh", ".npy", ".npz"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Bytes per element of every byte-sized safetensors dtype; a file with another is refused.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1, "U8": 1,
               "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024
# `base_model.model.<module>.lora_A.weight`: the only tensor names a stock PEFT LoRA saves that the engine loads.
_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# PEFT features that change what an adapter computes and that the engine does not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) are not supported by the engine; train a plain LoRA.",
    "modules_to_save": "'modules_to_save' (fully trained layers) is not supported; only LoRA matrices are served.",
    "lora_bias": "LoRA bias (lora_bias) is not supported by the engine.",
    "layer_replication": "'layer_replication' is not supported by the engine.",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens) is not supported by the engine.",
    "use_bdlora": "Block-diagonal LoRA (use_bdlora) is not supported by the engine.",
    "use_qalora": "QALoRA (use_qalora) is not supported by the engine.",
}
# Initialisations that only set the starting weights; the others (PiSSA, OLoRA, LoftQ...) change the base.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
# Patterns made of these characters only (no groups, repeats or alternatives) match in linear time.
_SIMPLE_PATTERN = re.compile(r"[\w.\-]*")
_REGEX_TIMEOUT = 5.0
_MATCHER = """
import json, re, sys
patterns, names = json.load(sys.stdin)
found = []
for pattern in patterns:
    try:
        found.append([i for i, name in enumerate(names) if re.fullmatch(pattern, name)])
    except (re.error, OverflowError, RecursionError):
        found.append(None)
print(json.dumps(found))
"""


class AdapterInvalid(ValueError):
    """The adapter is refused; the message names the problem for the uploader."""


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter is checked against: the served base model's identity and its linear layers."""

    model_id: str
    served_name: str
    path: Path
    max_rank: int

    @cached_property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`{module: (out_features, in_features)}` for every 2-D weight of the base model, e.g.
        `model.layers.0.self_attn.q_proj: (576, 576)`, read from the headers of its safetensors files.
        Embeddings are left out: the engine serves LoRA on linear layers only."""
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise BaseModelError(f"No *.safetensors files in the base model folder {self.path}; "
                                 "adapters cannot be checked against it.")
        shapes = {}
        for shard in shards:
            try:
                header = read_safetensors_header(shard)
            except AdapterInvalid as exc:  # the server's file, not the uploader's
                raise BaseModelError(f"The base model file {shard} cannot be read: {exc}") from exc
            for name, info in header.items():
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and len(info["shape"]) == 2 and "embed" not in module.rpartition(".")[2]:
                    shapes[module] = (info["shape"][0], info["shape"][1])
        return shapes

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
    config, ranks = _read_config(folder / CONFIG_FILE, base)
    tensors = read_safetensors_header(folder / WEIGHTS_FILE)
    _check_tensors(tensors, base, ranks)
    return AdapterInfo(config.rank, config.alpha, config.target_modules, len(tensors))


def _read_config(path: Path, base: BaseModelSpec) -> tuple[AdapterInfo, dict[str, int]]:
    """The adapter's settings, and the rank of each base module under them (PEFT's `rank_pattern`)."""
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
    for key, message in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterInvalid(message)
    if config.get("bias", "none") not in ("none", None):
        raise AdapterInvalid(f"LoRA bias (bias={config['bias']!r}) is not supported; train with bias='none'.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        raise AdapterInvalid(f"init_lora_weights={init!r} changes the base model's weights, which the engine "
                             "does not do; convert the adapter to a plain LoRA first.")
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
    if not _finite_positive(alpha):  # Python's json reads NaN, Infinity and 1e999 (inf)
        raise AdapterInvalid(f"'lora_alpha' must be a finite positive number, not {alpha!r}.")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_target_regex(targets, base)
        targets = [targets]
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterInvalid("'target_modules' must name the modules the adapter changes.")
    else:
        for target in targets:  # PEFT's rule: the module's name, or the end of it after a dot
            if not any(m == target or m.endswith(f".{target}") for m in base.linear_shapes):
                raise AdapterInvalid(f"Target module '{target}' is not a linear layer of the base model "
                                     f"'{base.model_id}'.")
    ranks = _module_ranks(config, rank, base)
    return AdapterInfo(rank, float(alpha), tuple(targets), 0), ranks


def _check_target_regex(pattern: str, base: BaseModelSpec) -> None:
    """PEFT reads a string `target_modules` as a regular expression over whole module names."""
    if not _fullmatches([pattern], list(base.linear_shapes))[0]:
        raise AdapterInvalid(f"'target_modules' is the regular expression {pattern!r}, which matches no linear "
                             f"layer of the base model '{base.model_id}'.")


def _module_ranks(config: dict, rank: int, base: BaseModelSpec) -> dict[str, int]:
    """The rank of each base module: that of the first `rank_pattern` key matching the end of its name
    (PEFT's and the engine's rule: `(.*\\.)?(key)`), else `r`."""
    rank_pattern = _pattern_field(config, "rank_pattern", base.max_rank)
    alpha_pattern = _pattern_field(config, "alpha_pattern", None)
    modules = list(base.linear_shapes)
    # alpha_pattern's keys are matched too, though only to vet them: the engine runs them as regexes as well.
    hits = _fullmatches([*rank_pattern, *alpha_pattern], modules, template=r"(.*\.)?({})")
    ranks = dict.fromkeys(modules, rank)
    for module in modules:
        for key, hit in zip(rank_pattern, hits[:len(rank_pattern)], strict=True):
            if module in hit:
                ranks[module] = rank_pattern[key]
                break
    return ranks


def _pattern_field(config: dict, field: str, max_rank: int | None) -> dict:
    """`rank_pattern` (positive ranks up to `max_rank`) or `alpha_pattern` (positive numbers)."""
    entries = config.get(field) or {}
    if not isinstance(entries, dict):
        raise AdapterInvalid(f"'{field}' must map module name patterns to numbers.")
    for key, value in entries.items():
        if max_rank is None:
            valid, need = _finite_positive(value), "a finite positive number"
        else:
            valid, need = isinstance(value, int) and 1 <= value <= max_rank, f"a rank from 1 to {max_rank}"
        if not valid or isinstance(value, bool):
            raise AdapterInvalid(f"'{field}' gives '{key}' the value {value!r}; it must be {need} on this server.")
    return entries


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _fullmatches(patterns: list[str], names: list[str], template: str = "{}") -> list[set[str]]:
    """The names each regular expression (`template` around the uploader's pattern) fully matches.

    A regular expression can take exponential time on a short name (ReDoS), and Python's cannot be
    interrupted, so any pattern beyond letters, digits, `_`, `.` and `-` runs in a child process that is
    stopped after a few seconds. Plain module names, the common case, match here."""
    hard = [p for p in patterns if not _SIMPLE_PATTERN.fullmatch(p)]
    found: dict[str, set[str]] = {}
    if hard:
        request = json.dumps([[template.format(p) for p in hard], names])
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _MATCHER], input=request, capture_output=True,
                                  text=True, timeout=_REGEX_TIMEOUT, check=True)
        except subprocess.TimeoutExpired as exc:
            raise AdapterInvalid(f"A pattern in {CONFIG_FILE} takes too long to match; simplify it.") from exc
        except subprocess.CalledProcessError as exc:
            raise AdapterInvalid(f"A pattern in {CONFIG_FILE} cannot be matched; simplify it.") from exc
        for pattern, indexes in zip(hard, json.loads(done.stdout), strict=True):
            if indexes is None:
                raise AdapterInvalid(f"{pattern!r} in {CONFIG_FILE} is not a valid regular expression.")
            found[pattern] = {names[i] for i in indexes}
    for pattern in patterns:
        if pattern not in found:
            regex = re.compile(template.format(pattern))
            found[pattern] = {name for name in names if regex.fullmatch(name)}
    return [found[p] for p in patterns]


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors' names, dtypes and shapes, read without loading any weights. Checks the file is whole
    and every byte is accounted for: each tensor's range is its shape times its dtype's size, and the
    ranges, in order, tile the data exactly (no overlap, no gap, nothing after the last)."""
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
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterInvalid(f"{path.name}: tensor '{name}' has a corrupt shape.")
        if info["dtype"] not in DTYPE_BYTES:
            raise AdapterInvalid(f"{path.name}: tensor '{name}' has the unknown dtype {info['dtype'][:20]!r}.")
        needed = math.prod(shape) * DTYPE_BYTES[info["dtype"]]
        if stop - start != needed:
            raise AdapterInvalid(f"{path.name}: tensor '{name}' spans {stop - start} bytes, but its shape "
                                 f"{shape} of {info['dtype']} needs {needed} bytes.")
    _check_tiling(path, header, data_len)
    return header


def _check_tiling(path: Path, header: dict[str, dict], data_len: int) -> None:
    """The tensors' byte ranges, in order, follow each other from 0 to the end of the data."""
    end = 0
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, stop = info["data_offsets"]
        if start < end:
            raise AdapterInvalid(f"{path.name}: tensor '{name}' overlaps the bytes of another tensor.")
        if start > end:
            raise AdapterInvalid(f"{path.name}: there is a gap of {start - end} bytes before tensor '{name}'.")
        end = stop
    if end != data_len:
        raise AdapterInvalid(f"{path.name} is truncated or has trailing bytes.")


def _check_tensors(tensors: dict[str, dict], base: BaseModelSpec, ranks: dict[str, int]) -> None:
    """Each tensor is the A or B matrix of a LoRA on a linear layer of the base model, shaped to fit it."""
    if not tensors:
        raise AdapterInvalid(f"{WEIGHTS_FILE} holds no tensors.")
    with_a, with_b = set(), set()
    for name, info in tensors.items():
        if info["dtype"] not in FLOAT_DTYPES:
            raise AdapterInvalid(f"Tensor '{name}' has dtype {info['dtype']}; LoRA weights must be floats.")
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            raise AdapterInvalid(_misnamed(name))
        module, ab = match["module"], match["ab"]
        if module not in base.linear_shapes:
            raise AdapterInvalid(f"Tensor '{name}' is for '{module}', which is not a linear layer of the base "
                                 f"model '{base.model_id}'.")
        out_features, in_features = base.linear_shapes[module]
        expected = [ranks[module], in_features] if ab == "A" else [out_features, ranks[module]]
        if info["shape"] != expected:
            raise AdapterInvalid(f"Tensor '{name}' has shape {info['shape']}, but the base model's layer "
                                 f"({out_features}x{in_features}) at rank {ranks[module]} needs {expected}.")
        (with_a if ab == "A" else with_b).add(module)
    unpaired = sorted(with_a ^ with_b)
    if unpaired:
        missing = "lora_B" if unpaired[0] in with_a else "lora_A"
        raise AdapterInvalid(f"The LoRA on '{unpaired[0]}' lacks its {missing} matrix.")


def _misnamed(name: str) -> str:
    """Why a tensor name is not one the engine loads."""
    if "lora_embedding_" in name:
        return f"Tensor '{name}' is a LoRA on an embedding; only LoRA on linear layers is served."
    if "modules_to_save" in name:
        return f"Tensor '{name}' is a fully trained layer (modules_to_save); only LoRA matrices are served."
    if "lora_magnitude_vector" in name:
        return f"Tensor '{name}' belongs to a DoRA adapter, which the engine does not support."
    if re.search(r"\.lora_[AB]\.[^.]+\.weight$", name):
        return (f"Tensor '{name}' carries an adapter name the engine cannot load; save the adapter with PEFT's "
                "save_pretrained, which leaves it out.")
    return f"Tensor '{name}' is not a LoRA A or B matrix named base_model.model.<module>.lora_A/B.weight."
