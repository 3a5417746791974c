"""The Kubernetes manifests under deploy/k8s: strict schema validation, kustomization, workloads, selectors
and the Prometheus rule. Nothing here needs a cluster or the engine."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests import deploy_files as files
from tests.deploy_files import IMAGE_UID, K8S, ROLES, ROOT, assert_cli_accepts, settings_from


def test_every_manifest_validates_strictly():
    failures = []
    for path, obj in files.manifests():
        try:
            files.validate_k8s(obj)
        except jsonschema.ValidationError as exc:
            failures.append(f"{path.relative_to(ROOT)} {obj['kind']}/{obj['metadata']['name']}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
    assert not failures, "\n".join(failures)
    kinds = {obj["kind"] for _, obj in files.manifests()}
    assert {"ServiceMonitor", "PrometheusRule", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_the_validation_refuses_misspelt_and_missing_fields():
    gateway = copy.deepcopy(files.workloads()["gateway"])
    files.pod(gateway)["containers"][0]["readynessProbe"] = files.pod(gateway)["containers"][0].pop("readinessProbe")
    rule = copy.deepcopy(files.objects("PrometheusRule")["loraserve"])
    rule["spec"]["groups"][0]["rules"][0]["fore"] = "1m"
    monitor = copy.deepcopy(files.objects("ServiceMonitor")["loraserve-engine"])
    del monitor["spec"]["selector"]
    for broken in (gateway, rule, monitor):
        with pytest.raises(jsonschema.ValidationError):
            files.validate_k8s(broken)


@pytest.mark.parametrize("folder", [K8S, K8S / "monitoring"], ids=["k8s", "monitoring"])
def test_kustomization_applies_every_manifest_but_the_example_secret(folder):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(present)
    assert shutil.which("kubectl"), "kubectl (part of this machine image) renders the kustomization"
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert len(docs) == sum(len(files.load_all(folder / name)) for name in kustomization["resources"])
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    for obj in docs:
        files.validate_k8s(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "loraserve"
        assert all(c["image"] == images["loraserve"] for c in files.containers(obj))


def test_k8s_workloads(monkeypatch):
    loads, config = files.workloads(), files.objects("ConfigMap")["loraserve-config"]["data"]
    assert loads.keys() == set(ROLES)
    settings = settings_from(config, monkeypatch)
    claims = files.objects("PersistentVolumeClaim")
    assert "ReadWriteMany" in claims["loraserve-registry"]["spec"]["accessModes"]
    secret = files.objects("Secret")["loraserve-secrets"]["stringData"]
    assert "postgresql+psycopg://" in secret["database-url"] and "CHANGE-ME" in secret["admin-key"]
    assert secret["redis-url"].startswith("redis://")  # several gateways count tenant limits together
    secret_vars = {}
    for obj in [*loads.values(), *files.objects("Job").values()]:
        spec = files.pod(obj)
        # Services named loraserve-* would inject LORASERVE_ENGINE_PORT=tcp://... and the like.
        assert spec["enableServiceLinks"] is False, obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == IMAGE_UID
        assert all(v["persistentVolumeClaim"]["claimName"] in claims for v in spec["volumes"]
                   if "persistentVolumeClaim" in v)
        for c in files.containers(obj):
            assert c["image"] == "loraserve" and c["envFrom"] == [{"configMapRef": {"name": "loraserve-config"}}]
            if "args" in c:
                assert_cli_accepts(c["args"])
            for var in c.get("env", []):
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "loraserve-secrets" and ref["key"] in secret
                secret_vars[var["name"]] = ref["key"]
        assert files.claim_mounts(obj).get("loraserve-models") in (None, str(settings.model_path.parent))
    assert secret_vars == {"LORASERVE_DATABASE_URL": "database-url", "LORASERVE_ADMIN_KEY": "admin-key",
                           "LORASERVE_METRICS_TOKEN": "metrics-token", "LORASERVE_REDIS_URL": "redis-url"}

    for role, obj in loads.items():
        main = files.pod(obj)["containers"][0]
        paths = files.claim_mounts(obj)
        assert Path(paths["loraserve-registry"]) == settings.registry_path, f"{role}: registry path differs"
        assert Path(paths["loraserve-models"]) == settings.model_path.parent
        assert "livenessProbe" in main, f"{role} has no liveness probe"
        ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
        if ports:
            assert "readinessProbe" in main, f"{role} serves a port but has no readiness probe"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "httpGet" in main.get(probe, {}):
                assert main[probe]["httpGet"]["port"] in ports
        if role in ("gateway", "worker"):
            assert Path(paths["loraserve-data"]) == settings.data_dir

    gateway = loads["gateway"]
    main = files.pod(gateway)["containers"][0]
    assert gateway["kind"] == "Deployment" and gateway["spec"]["replicas"] >= 2
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["ports"][0]["containerPort"] == settings.port
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and files.pod(gateway)["terminationGracePeriodSeconds"] > 30 + int(pre_stop[1])

    engine = loads["engine"]
    main = files.pod(engine)["containers"][0]
    assert engine["kind"] == "StatefulSet" and main["args"] == ["engine", "--listen", "0.0.0.0"]
    name, service = engine["metadata"]["name"], engine["spec"]["serviceName"]
    assert files.objects("Service")[service]["spec"]["clusterIP"] == "None"
    assert settings.engine_urls == [f"http://{name}-{i}.{service}:{settings.engine_port}"
                                    for i in range(engine["spec"]["replicas"])]
    assert main["ports"][0]["containerPort"] == settings.engine_port
    assert all(main[p]["httpGet"]["path"] == "/health" for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(m["name"] for m in main["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in files.pod(engine)["volumes"] if v["name"] == shm)["emptyDir"]["medium"] == "Memory"
    assert loads["worker"]["spec"]["replicas"] == 1


def test_k8s_selectors_select_the_right_pods():
    pods = {role: obj["spec"]["template"]["metadata"]["labels"] for role, obj in files.workloads().items()}

    def selected(labels: dict) -> list[str]:
        return [role for role, pod_labels in pods.items() if labels.items() <= pod_labels.items()]

    for role, obj in files.workloads().items():
        assert selected(obj["spec"]["selector"]["matchLabels"]) == [role]
    services = files.objects("Service")
    for service in services.values():
        [role] = selected(service["spec"]["selector"])
        ports = {p["name"] for p in files.pod(files.workloads()[role])["containers"][0]["ports"]}
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    assert sorted(r for pdb in files.objects("PodDisruptionBudget").values()
                  for r in selected(pdb["spec"]["selector"]["matchLabels"])) == ["engine", "gateway"]
    [policy] = files.objects("NetworkPolicy").values()
    assert selected(policy["spec"]["podSelector"]["matchLabels"]) == ["engine"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert "gateway" in allowed and "engine" not in allowed
    # Each ServiceMonitor selects one Service, whose job label is the job name of deploy/prometheus.yml, so
    # the alert rules (up{job="vllm-engine"}, ...) mean the same with and without the operator.
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    labelled = set()
    for monitor in files.objects("ServiceMonitor").values():
        [service] = [s for s in services.values()
                     if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        labelled.add(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert labelled == jobs


def test_prometheus_rule_is_deploy_alerts_and_promtool_accepts_it(tmp_path):
    alerts = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    groups = files.objects("PrometheusRule")["loraserve"]["spec"]["groups"]
    assert groups == alerts["groups"], "deploy/k8s/monitoring/prometheusrule.yaml differs from deploy/alerts.yml"
    assert shutil.which("promtool"), "promtool comes with Prometheus, which `make test` installs"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    checked = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
