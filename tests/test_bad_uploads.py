"""Hostile and broken adapter uploads: each is refused with a 4xx that names the problem, runs no code,
leaves nothing in the registry or its staging folder, and the engine keeps serving."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.adapter_files import HIDDEN, write_adapter
from tests.conftest import UNPACKED_LIMIT, UPLOAD_LIMIT

TENANT = "mallory"


class _Marker:
    """Unpickling this runs `open(marker, "w")`: proof of code execution if the file ever appears."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def adapter_files(tmp: Path, **kwargs) -> dict[str, bytes]:
    folder = write_adapter(tmp / "adapter", **kwargs)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def with_config(tmp: Path, **changes) -> dict[str, bytes]:
    files = adapter_files(tmp)
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    files["adapter_config.json"] = json.dumps(config).encode()
    return files


def with_tensors(tmp: Path, tensors: dict) -> dict[str, bytes]:
    files = adapter_files(tmp)
    save_file(tensors, str(tmp / "t.safetensors"))
    files["adapter_model.safetensors"] = (tmp / "t.safetensors").read_bytes()
    return files


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def good_members(tmp: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(tarfile.TarInfo(name), data) for name, data in adapter_files(tmp).items()]


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("adapter_model.safetensors", b"\0" * (UNPACKED_LIMIT + (1 << 20)))
    return buffer.getvalue()


def too_many_files(tmp: Path) -> bytes:
    return tar_of(good_members(tmp) + [(tarfile.TarInfo(f"README{i}.md"), b"x") for i in range(10)])


# (case id, form name, what to send: files dict or ("archive", bytes), expected status, words in the message)
def cases(tmp: Path, marker: Path):
    pickled = pickle.dumps(_Marker(marker))
    good = adapter_files(tmp)
    a_shape = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    yield "pickle-bin-beside-safetensors", "x", {**good, "adapter_model.bin": pickled}, 422, "pickle"
    yield "pytorch-pt", "x", {**good, "weights.pt": pickled}, 422, "pickle"
    yield "pkl", "x", {**good, "extra.pkl": pickled}, 422, "pickle"
    yield "ckpt", "x", {**good, "model.ckpt": pickled}, 422, "pickle"
    yield "python-code", "x", {**good, "modeling.py": b"import os"}, 422, "code"
    yield "only-pickle", "x", {"adapter_config.json": good["adapter_config.json"], "adapter_model.bin": pickled}, \
        422, "pickle"
    yield "auto-map", "x", with_config(tmp, auto_map={"AutoModel": "m.M"}), 422, "auto_map"
    yield "not-lora", "x", with_config(tmp, peft_type="PREFIX_TUNING"), 422, "LoRA"
    yield "dora", "x", with_config(tmp, use_dora=True), 422, "DoRA"
    yield "no-config", "x", {"adapter_model.safetensors": good["adapter_model.safetensors"]}, 422, "missing"
    yield "no-weights", "x", {"adapter_config.json": good["adapter_config.json"]}, 422, "missing"
    yield "config-not-json", "x", {**good, "adapter_config.json": b"{nope"}, 422, "JSON"
    yield "other-base-model", "x", with_config(tmp, base_model_name_or_path="meta-llama/Llama-2-7b-hf"), 422, \
        "made for"
    yield "rank-too-high", "x", adapter_files(tmp / "r", rank=64), 422, "rank"
    yield "unknown-target-module", "x", with_config(tmp, target_modules=["q_proj", "frobnicator"]), 422, \
        "frobnicator"
    yield "tensor-not-in-base", "x", with_tensors(tmp, {
        "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": np.zeros((4, HIDDEN), np.float32),
        "base_model.model.model.layers.99.self_attn.q_proj.lora_B.weight": np.zeros((HIDDEN, 4), np.float32),
    }), 422, "layers.99"
    yield "wrong-shape", "x", with_tensors(tmp, {
        a_shape: np.zeros((4, 100), np.float32),
        a_shape.replace("lora_A", "lora_B"): np.zeros((HIDDEN, 4), np.float32),
    }), 422, "shape"
    yield "integer-tensors", "x", adapter_files(tmp / "i", dtype=np.int32), 422, "float"
    yield "corrupt-safetensors", "x", {**good, "adapter_model.safetensors": b"\x10\x00\x00\x00garbage!"}, 422, \
        "safetensors"
    yield "truncated-safetensors", "x", {**good, "adapter_model.safetensors":
                                         good["adapter_model.safetensors"][:-1000]}, 422, "truncated"
    yield "upper-case-name", "Bad", good, 400, "not valid"
    yield "traversal-name", "../alpha/support", good, 400, "not valid"
    yield "reserved-name", "default", good, 400, "reserved"
    yield "slash-in-file-name", "x", {**good, "../adapter_config.json": good["adapter_config.json"]}, 400, "plain"
    yield "archive-absolute-path", "x", ("archive", tar_of([(tarfile.TarInfo("/etc/adapter_config.json"),
                                                             good["adapter_config.json"])])), 422, "absolute"
    yield "archive-dotdot", "x", ("archive", tar_of([(tarfile.TarInfo("../adapter_config.json"),
                                                      good["adapter_config.json"])])), 422, ".."
    yield "archive-symlink", "x", ("archive", tar_of([*good_members(tmp), special("link", tarfile.SYMTYPE,
                                                                                 "/etc/passwd")])), 422, "link"
    yield "archive-hardlink", "x", ("archive", tar_of([*good_members(tmp), special("hard", tarfile.LNKTYPE,
                                                                                  "adapter_config.json")])), 422, \
        "link"
    yield "archive-device", "x", ("archive", tar_of([*good_members(tmp), special("dev", tarfile.CHRTYPE)])), 422, \
        "device"
    yield "archive-too-many-files", "x", ("archive", too_many_files(tmp)), 422, "files"
    yield "zip-bomb", "x", ("archive", zip_bomb()), 422, "bytes"
    yield "not-an-archive", "x", ("archive", b"just some text"), 422, "archive"
    yield "truncated-archive", "x", ("archive", tar_of(good_members(tmp))[:200]), 422, "corrupt"
    yield "upload-too-large", "x", ("archive", b"\0" * (UPLOAD_LIMIT + 1)), 413, "larger"


@pytest.fixture(scope="module")
def mallory(gateway):
    assert gateway.admin("POST", "/tenants", json={"id": TENANT}).status_code == 201
    return TENANT


def test_every_bad_upload_is_refused_cleanly(gateway, mallory, tmp_path):
    marker = tmp_path / "code-ran"
    seen = []
    for case, name, payload, status, words in cases(tmp_path, marker):
        if isinstance(payload, tuple):
            response = gateway.admin("POST", f"/tenants/{mallory}/adapters", data={"name": name},
                                     files={"archive": ("adapter.tar.gz", payload[1])})
        else:
            response = gateway.admin("POST", f"/tenants/{mallory}/adapters", data={"name": name},
                                     files=[("files", (fname, data)) for fname, data in payload.items()])
        error = response.json().get("error", {})
        assert response.status_code == status, (case, response.text)
        assert words.lower() in error.get("message", "").lower(), (case, error)
        assert set(error) == {"message", "type", "param", "code"}, case
        assert "Traceback" not in response.text and str(gateway.settings.data_dir) not in response.text, case
        assert not marker.exists(), case
        assert not (gateway.settings.registry_path / TENANT).exists(), case
        assert list((gateway.settings.registry_path / ".staging").iterdir()) == [], case
        seen.append(case)
    assert len(seen) >= 25
    # Both ways of sending, or neither, is a plain 400.
    both = gateway.admin("POST", f"/tenants/{mallory}/adapters", data={"name": "x"}, files=[
        ("archive", ("a.tar.gz", b"x")), ("files", ("adapter_config.json", b"{}"))])
    neither = gateway.admin("POST", f"/tenants/{mallory}/adapters", data={"name": "x"})
    assert both.status_code == 400 and neither.status_code == 400
    assert gateway.admin("POST", "/tenants/nobody/adapters", data={"name": "x"},
                         files=[("files", ("a", b"b"))]).status_code == 404
    # Nothing of it reached the engine, which still answers.
    assert not any(m.startswith(f"{TENANT}--") for m in gateway.engine_models())
    reply = gateway.client(gateway.tenants["alpha"].key).chat.completions.create(
        model="support", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content
    audit = gateway.admin("GET", "/audit", params={"limit": 200}).json()["data"]
    assert sum(1 for r in audit if r["action"] == "adapter.upload" and r["result"].startswith("refused")) >= 25
