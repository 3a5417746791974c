"""Reading the deployment files for test_deploy.py and test_deploy_k8s.py: compose, Kubernetes, Dockerfiles.

Also the schemas of the two Prometheus-operator kinds (kubernetes-validate has none for custom resources),
written from the fields the operator's CRDs document; strict, so a misspelt field, which the API server
would silently prune, fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.cli import main as cli_main
from server.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
PROBE = ROOT / "deploy" / "docker" / "probe.py"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
K8S_VERSION = "1.32"
CRD_API = "monitoring.coreos.com/v1"

DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|[smhdwy]))+)$"}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
SECRET_KEY_REF = {"type": "object", "required": ["name", "key"], "additionalProperties": False,
                  "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                                 "optional": {"type": "boolean"}}}
AUTHORIZATION = {"type": "object", "required": ["credentials"], "additionalProperties": False,
                 "properties": {"type": {"type": "string"}, "credentials": SECRET_KEY_REF}}
SELECTOR = {"type": "object", "additionalProperties": False,
            "properties": {"matchLabels": STRINGS, "matchExpressions": {"type": "array"}}}


def _crd(spec: dict) -> dict:
    metadata = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "namespace": {"type": "string"},
        "labels": STRINGS, "annotations": STRINGS}}
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": CRD_API}, "kind": {"type": "string"}, "metadata": metadata,
                           "spec": {"type": "object", "additionalProperties": False, **spec}}}


RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
        "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                       "expr": {"type": ["string", "integer"]}, "for": DURATION,
                       "keep_firing_for": DURATION, "labels": STRINGS, "annotations": STRINGS}}
CRD_SCHEMAS = {
    "ServiceMonitor": _crd({"required": ["selector", "endpoints"], "properties": {
        "jobLabel": {"type": "string"}, "selector": SELECTOR, "targetLabels": {"type": "array"},
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": False,
                      "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                     "scheme": {"enum": ["http", "https"]}, "interval": DURATION,
                                     "scrapeTimeout": DURATION, "authorization": AUTHORIZATION}}}}}),
    "PrometheusRule": _crd({"required": ["groups"], "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "minLength": 1}, "interval": DURATION, "limit": {"type": "integer"},
            "rules": {"type": "array", "items": RULE}}}}}}),
}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(service: dict) -> dict[str, str]:
    """Mount target -> source (a named volume or a host path) of a compose service."""
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service.get("volumes", [])}


def target_of(service: dict, volume: str) -> Path:
    return Path(next(target for target, source in mounts(service).items() if source == volume))


def manifests() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml" for doc in load_all(p)]


def objects(kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for _, obj in manifests() if obj["kind"] == kind}


def workloads() -> dict[str, dict]:
    return {obj["metadata"]["labels"]["app.kubernetes.io/component"]: obj
            for _, obj in manifests() if obj["kind"] in ("Deployment", "StatefulSet")}


def pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    if "template" not in obj.get("spec", {}):
        return []
    return [*pod(obj).get("initContainers", []), *pod(obj)["containers"]]


def claim_mounts(obj: dict) -> dict[str, str]:
    """PVC name -> mount path in the pod's main containers."""
    volumes = {v["name"]: v for v in pod(obj)["volumes"]}
    return {volumes[m["name"]]["persistentVolumeClaim"]["claimName"]: m["mountPath"]
            for c in pod(obj)["containers"] for m in c.get("volumeMounts", [])
            if "persistentVolumeClaim" in volumes[m["name"]]}


def validate_k8s(obj: dict) -> None:
    if obj["apiVersion"] == CRD_API:
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    else:  # raises SchemaNotFoundError for a kind it has no schema for: that fails the test too
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def dockerfile(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerignored(path: str) -> bool:
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        regex = re.escape(pattern.lstrip("!").strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not pattern.startswith("!")
    return ignored


ROLES = ("gateway", "engine", "worker")
IMAGE_UID = 10001


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("LORASERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def assert_cli_accepts(args: list[str]) -> None:
    """`loraserve ARGS --help` exits 0 only when the command and its options exist."""
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--help"])
    assert exit_.value.code == 0, f"`loraserve {' '.join(args)}` is not a loraserve command"


# Compose
