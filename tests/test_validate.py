"""Adapter validation against the base model's real layers, read from its safetensors headers (no torch)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from adapters import validate
from adapters.basemodel import BaseModelError
from adapters.validate import AdapterInvalid, BaseModelSpec, validate_adapter_dir
from tests.adapter_files import write_adapter
from tests.base_files import HIDDEN, INTERMEDIATE, KV_DIM, write_fake_base

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SERVED = "SmolLM2-135M-Instruct"
REAL_BASE = Path(__file__).resolve().parents[1] / ".cache" / "models" / SERVED
Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"


@pytest.fixture
def base(tmp_path) -> BaseModelSpec:
    return BaseModelSpec(MODEL_ID, SERVED, write_fake_base(tmp_path / "base"), max_rank=16)


def spec(path: Path) -> BaseModelSpec:
    return BaseModelSpec(MODEL_ID, SERVED, path, max_rank=16)


def adapter(tmp_path: Path, tensors: dict[str, list[int]] | None = None, **config) -> Path:
    """A good adapter (q_proj, v_proj of layers 0-1, rank 4) with `config` merged in and, if given, its
    tensors replaced by zeros of the given shapes."""
    folder = write_adapter(tmp_path / "adapter", config=config)
    if tensors is not None:
        save_file({n: np.zeros(s, np.float32) for n, s in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def refused(folder: Path, base: BaseModelSpec, *words: str) -> str:
    with pytest.raises(AdapterInvalid) as caught:
        validate_adapter_dir(folder, base)
    for word in words:
        assert word in str(caught.value)
    return str(caught.value)


# The base model's shapes

def test_base_shapes_come_from_every_shard_and_are_cached(tmp_path):
    base = spec(write_fake_base(tmp_path / "base", shards=3))
    shapes = base.linear_shapes
    assert len(shapes) == 14  # 7 linear layers x 2 layers; no norms (1-D), no embedding
    assert shapes["model.layers.1.self_attn.q_proj"] == (HIDDEN, HIDDEN)
    assert shapes["model.layers.0.self_attn.k_proj"] == (KV_DIM, HIDDEN)
    assert shapes["model.layers.0.mlp.down_proj"] == (HIDDEN, INTERMEDIATE)
    assert "model.embed_tokens" not in shapes
    assert base.linear_shapes is shapes


def test_the_fake_base_is_a_real_safetensors_file(tmp_path):
    folder = write_fake_base(tmp_path / "base")
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.layers.0.self_attn.v_proj.weight").shape == (KV_DIM, HIDDEN)


@pytest.mark.usefixtures("base_model_path")  # prepares REAL_BASE once (tests/conftest.py)
def test_shapes_of_the_real_base_model(tmp_path):
    base = spec(REAL_BASE)
    shapes = base.linear_shapes
    assert len(shapes) == 30 * 7
    expected = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
                "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                "mlp.down_proj": (576, 1536)}
    for layer in (0, 29):
        for module, shape in expected.items():
            assert shapes[f"model.layers.{layer}.{module}"] == shape
    assert validate_adapter_dir(write_adapter(tmp_path / "a"), base).tensor_count == 8


def test_a_base_folder_without_weights_is_the_servers_problem(tmp_path):
    a = write_adapter(tmp_path / "a")
    with pytest.raises(BaseModelError, match=r"No \*\.safetensors files"):
        validate_adapter_dir(a, spec(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{not json")
    with pytest.raises(BaseModelError, match="cannot be read"):
        validate_adapter_dir(a, spec(broken))


# Good adapters

def test_a_good_adapter_passes(tmp_path, base):
    info = validate_adapter_dir(write_adapter(tmp_path / "a"), base)
    assert (info.rank, info.target_modules, info.tensor_count) == (4, ("q_proj", "v_proj"), 8)


def test_targets_may_be_a_dotted_suffix_or_a_regex(tmp_path, base):
    assert validate_adapter_dir(adapter(tmp_path, target_modules=["self_attn.q_proj", "v_proj"]), base)
    info = validate_adapter_dir(adapter(tmp_path / "b", target_modules=r".*\.(q_proj|v_proj)"), base)
    assert info.target_modules == (r".*\.(q_proj|v_proj)",)


def test_rank_pattern_sets_the_rank_of_matching_modules(tmp_path, base):
    tensors = {f"{Q}.lora_A.weight": [4, HIDDEN], f"{Q}.lora_B.weight": [HIDDEN, 4],
               f"{V}.lora_A.weight": [8, HIDDEN], f"{V}.lora_B.weight": [KV_DIM, 8]}
    assert validate_adapter_dir(adapter(tmp_path, tensors, rank_pattern={"v_proj": 8}), base)
    # A key is a regular expression matched against the end of the name, as PEFT and the engine do.
    regex = {r"layers\.0\.self_attn\.v_proj": 8, "layers.1.self_attn.v_proj": 2}
    assert validate_adapter_dir(adapter(tmp_path / "b", tensors, rank_pattern=regex), base)
    refused(adapter(tmp_path / "c", tensors, rank_pattern={"q_proj": 8}), base, "rank 8 needs [8, 576]")


# target_modules

@pytest.mark.parametrize(("targets", "words"), [
    (["q_proj", "nope_proj"], "'nope_proj' is not a linear layer"),
    (["embed_tokens"], "'embed_tokens' is not a linear layer"),
    (["input_layernorm"], "not a linear layer"),
    (["proj"], "'proj' is not a linear layer"),  # a whole name part, not any ending
    ("model.*lm_head", "matches no linear layer"),
    ("q_proj", "matches no linear layer"),  # a string is a regex over whole names
    ("(q_proj", "not a valid regular expression"),
])
def test_targets_the_base_model_lacks_are_refused(tmp_path, base, targets, words):
    refused(adapter(tmp_path, target_modules=targets), base, words)


def test_a_catastrophic_regex_is_stopped(tmp_path, base, monkeypatch):
    monkeypatch.setattr(validate, "_REGEX_TIMEOUT", 1.0)
    started = time.monotonic()
    refused(adapter(tmp_path, target_modules=r"(.|\w)*!"), base, "too long to match")
    refused(adapter(tmp_path / "b", rank_pattern={r"(.|\w)*!": 8}), base, "too long to match")
    assert time.monotonic() - started < 10


# Tensor names

@pytest.mark.parametrize(("name", "words"), [
    ("model.layers.0.self_attn.q_proj.lora_A.weight", "not a LoRA A or B matrix"),  # no base_model.model.
    (f"{Q}.lora_A.default.weight", "adapter name"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding"),
    ("base_model.model.lm_head.modules_to_save.weight", "modules_to_save"),
    (f"{Q}.lora_magnitude_vector", "DoRA"),
    (f"{Q}.lora_B.bias", "not a LoRA A or B matrix"),
    (f"{Q}.weight", "not a LoRA A or B matrix"),
    ("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", "not a linear layer of the base model"),
    ("base_model.model.model.layers.0.input_layernorm.lora_A.weight", "not a linear layer of the base model"),
    ("base_model.model.model.embed_tokens.lora_A.weight", "not a linear layer of the base model"),
])
def test_tensors_that_are_not_lora_on_a_base_layer_are_refused(tmp_path, base, name, words):
    tensors = {f"{V}.lora_A.weight": [4, HIDDEN], f"{V}.lora_B.weight": [KV_DIM, 4], name: [4, HIDDEN]}
    refused(adapter(tmp_path, tensors), base, words)


# Tensor shapes

@pytest.mark.parametrize(("shapes", "words"), [
    ([[4, KV_DIM], [HIDDEN, 4]], "needs [4, 576]"),  # A: in_features wrong
    ([[4, HIDDEN], [KV_DIM, 4]], "needs [576, 4]"),  # B: out_features wrong (v_proj's, not q_proj's)
    ([[8, HIDDEN], [HIDDEN, 8]], "rank 4 needs [4, 576]"),  # rank other than the config's r
    ([[4, HIDDEN], [HIDDEN, 2]], "rank 4 needs [576, 4]"),
    ([[4, HIDDEN, 1], [HIDDEN, 4]], "needs [4, 576]"),  # not 2-D
])
def test_shapes_that_do_not_fit_the_layer_are_refused(tmp_path, base, shapes, words):
    tensors = {f"{Q}.lora_A.weight": shapes[0], f"{Q}.lora_B.weight": shapes[1]}
    refused(adapter(tmp_path, tensors), base, words)


def test_a_half_lora_is_refused(tmp_path, base):
    refused(adapter(tmp_path, {f"{Q}.lora_A.weight": [4, HIDDEN]}), base, "lacks its lora_B")
    refused(adapter(tmp_path / "b", {f"{Q}.lora_B.weight": [HIDDEN, 4]}), base, "lacks its lora_A")


# The config

@pytest.mark.parametrize(("config", "words"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"rank_pattern": {"v_proj": 32}}, "from 1 to 16"),  # above the server's maximum rank
    ({"rank_pattern": {"v_proj": 0}}, "from 1 to 16"),
    ({"rank_pattern": ["v_proj"]}, "must map"),
    ({"alpha_pattern": {"v_proj": "big"}}, "positive number"),
])
def test_features_the_engine_does_not_serve_are_refused(tmp_path, base, config, words):
    refused(adapter(tmp_path, **config), base, words)


def test_stock_options_are_accepted(tmp_path, base):
    config = {"use_dora": False, "modules_to_save": None, "bias": "none", "init_lora_weights": "gaussian",
              "use_rslora": True, "alpha_pattern": {"v_proj": 16}, "rank_pattern": {}}
    assert validate_adapter_dir(adapter(tmp_path, **config), base)


# The checks from before still hold

def test_earlier_checks_still_hold(tmp_path, base):
    refused(adapter(tmp_path, peft_type="IA3"), base, "Only LoRA")
    refused(adapter(tmp_path / "b", r=32), base, "above this server's maximum")
    refused(adapter(tmp_path / "c", base_model_name_or_path="meta-llama/Llama-3-8B"), base, "made for")
    pickled = write_adapter(tmp_path / "d")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    refused(pickled, base, "pickle")
    ints = write_adapter(tmp_path / "e", dtype=np.int32)
    refused(ints, base, "must be floats")


# Byte ranges of the weights and the numbers of the config (issue 12, item 7)

def rewrite_safetensors(folder: Path, edit) -> Path:
    """Re-write the adapter's safetensors file with its header passed through `edit(header) -> header`
    (the data bytes are kept; `edit` may also return `(header, data)` to change them)."""
    import json
    import struct

    path = folder / "adapter_model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    edited = edit(header)
    header, data = edited if isinstance(edited, tuple) else (edited, data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return folder


def two_tensors(header: dict) -> tuple[dict, dict]:
    """The first two tensors in file order (their data_offsets ascending)."""
    named = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return header[named[0]], header[named[1]]


def test_overlapping_byte_ranges_are_refused(tmp_path, base):
    """Two tensors reading the same bytes (the second's range moved onto the first's, the file padded
    to keep its length): every range was checked only against the file's end, so it passed. Failed
    before the fix."""
    def overlap(header):
        first, second = two_tensors(header)
        second["data_offsets"] = list(first["data_offsets"])
        return header

    refused(rewrite_safetensors(write_adapter(tmp_path / "a"), overlap), base, "overlap")


def test_a_gap_between_tensors_is_refused(tmp_path, base):
    """Bytes that no tensor covers, in the middle of the data. Failed before the fix."""
    def gap(header):
        first, _ = two_tensors(header)
        for info in header.values():
            if isinstance(info, dict) and "data_offsets" in info and info is not first:
                info["data_offsets"] = [o + 8 for o in info["data_offsets"]]
        return header

    folder = write_adapter(tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    rewrite_safetensors(folder, gap)
    path.write_bytes(path.read_bytes() + bytes(8))  # the data grew by the gap
    refused(folder, base, "gap")


def test_a_range_shorter_than_shape_times_dtype_is_refused(tmp_path, base):
    """A tensor whose byte range is not its shape times its dtype's size (here F16 over F32 bytes: half
    the bytes would be read as garbage or the rest ignored). Failed before the fix."""
    def retype(header):
        first, _ = two_tensors(header)
        first["dtype"] = "F16"
        return header

    refused(rewrite_safetensors(write_adapter(tmp_path / "a"), retype), base, "bytes")


def test_the_ranges_must_cover_the_data_exactly(tmp_path, base):
    """Trailing bytes after the last tensor are still refused, and so is a range starting past 0."""
    folder = write_adapter(tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes() + bytes(8))
    refused(folder, base, "trailing")

    def shift_all(header):
        for info in header.values():
            if isinstance(info, dict) and "data_offsets" in info:
                info["data_offsets"] = [o + 4 for o in info["data_offsets"]]
        return header

    folder = write_adapter(tmp_path / "b")
    rewrite_safetensors(folder, shift_all)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes() + bytes(4))
    refused(folder, base, "gap")


def test_an_unknown_dtype_is_refused(tmp_path, base):
    def unknown(header):
        first, _ = two_tensors(header)
        first["dtype"] = "F128"
        return header

    refused(rewrite_safetensors(write_adapter(tmp_path / "a"), unknown), base, "F128")


def test_real_safetensors_files_pass_the_range_checks(tmp_path, base):
    """Files written by the safetensors library, every float dtype, and the fake base's sparse files."""
    for dtype in (np.float16, np.float32, np.float64):
        assert validate_adapter_dir(write_adapter(tmp_path / str(np.dtype(dtype)), dtype=dtype), base)
    assert base.linear_shapes


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity", "1e999", "0", "-8"])
def test_lora_alpha_must_be_finite_and_positive(tmp_path, base, alpha):
    """Python's json reads NaN and Infinity (and 1e999 as inf); a NaN or infinite scale makes every
    output NaN. Failed before the fix (any number passed)."""
    folder = write_adapter(tmp_path / "a")
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text.replace('"lora_alpha": 4', f'"lora_alpha": {alpha}'))
    refused(folder, base, "lora_alpha", "finite positive")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e999"])
def test_alpha_pattern_values_must_be_finite(tmp_path, base, value):
    """`alpha_pattern` refused NaN (NaN > 0 is false) but took Infinity. Failed before the fix."""
    folder = write_adapter(tmp_path / "a")
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[:-1] + f', "alpha_pattern": {{"v_proj": {value}}}}}')
    refused(folder, base, "alpha_pattern", "finite positive")
