"""Kubernetes manifests, validated without a cluster: rendered by kustomize,
checked against the pinned Kubernetes API's schemas, and against what the image
and tritonserver actually serve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from samtriton import container, server

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
OVERLAYS = ["base", "overlays/shared-engine-cache"]
# The Kubernetes API version the manifests target (schemas from kubernetes-validate).
KUBERNETES_VERSION = "1.33"
# Triton's HTTP health endpoints (KServe v2 protocol).
READY, LIVE = "/v2/health/ready", "/v2/health/live"
# Metric families tritonserver exports (Triton's metrics docs); the dashboard
# and the autoscaling rule may only use these.
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_cache_num_hits_per_model", "nv_cache_num_misses_per_model",
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
}


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (make setup / .ci/run install it)"
    proc = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return _render(request.param)


def test_every_resource_validates_against_the_pinned_api(rendered):
    kinds = set()
    for doc in rendered:
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PodMonitor",
            "ConfigMap"} <= kinds


def test_deployment_matches_the_image_and_tritonserver(rendered):
    dep = _one(rendered, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # Settings go through the environment the entrypoint reads; no unknown one.
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert set(env) <= set(container.ENV_VARS), set(env) - set(container.ENV_VARS)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env["SAMTRITON_HTTP_PORT"]), "grpc": int(env["SAMTRITON_GRPC_PORT"]),
                     "metrics": int(env["SAMTRITON_METRICS_PORT"])}
    assert "args" not in c and "command" not in c  # the image's entrypoint runs as built
    # What that entrypoint launches serves these ports with the secure flags.
    cmd = server.server_command(container.options_from_env(Path("/r"), {k: v for k, v in env.items() if v}))
    for name, port in ports.items():
        assert f"--{name}-port={port}" in cmd
    assert "--model-control-mode=none" in cmd
    # Probes: Triton's readiness and liveness endpoints on the HTTP port.
    assert c["startupProbe"]["httpGet"] == {"path": READY, "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": READY, "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": LIVE, "port": "http"}
    startup_s = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup_s >= 15 * 60  # engine builds on a new GPU model
    # Drain (bounded by the exit timeout) + Triton's own exit timeout fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] > 2 * server.EXIT_TIMEOUT_S
    # GPU placement.
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present"
    # /dev/shm in memory for the python backend; the user the image runs as.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/engines"] == "engines" and env["SAMTRITON_ENGINE_CACHE"] == "/engines"
    dockerfile_user = re.findall(r"^USER (\d+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)[-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # A read-only root file system needs a writable place for the working repository.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(env["SAMTRITON_WORK_DIR"].startswith(path) for path in mounts)


def test_services_pdb_and_monitor_select_the_pods(rendered):
    dep = _one(rendered, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for svc in (d for d in rendered if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    assert {p["port"] for p in _one(rendered, "Service", "samtriton")["spec"]["ports"]} == {8000, 8001, 8002}
    assert _one(rendered, "Service", "samtriton-headless")["spec"]["clusterIP"] == "None"
    pdb = _one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = _one(rendered, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["minReplicas"] - 1 >= pdb["spec"]["maxUnavailable"]


def test_autoscaling_metric_is_served_by_the_adapter_rule(rendered):
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(rendered, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(_one(rendered, "ConfigMap", "samtriton-prometheus-adapter-rules")["data"]["config.yaml"])
    (rule,) = [r for r in rules["rules"] if r["name"]["as"] == name]
    query = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert "<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query
    assert set(re.findall(r"\bnv_\w+", query)) <= TRITON_METRICS
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_grafana_dashboard_uses_triton_metrics(rendered):
    cm = _one(rendered, "ConfigMap", "samtriton-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["samtriton.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bnv_\w+", e)}
    assert used <= TRITON_METRICS, used - TRITON_METRICS
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("latency", "queue", "batch size", "cache"):
        assert topic in titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_shared_cache_overlay_swaps_the_engine_volume():
    docs = _render("overlays/shared-engine-cache")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    engines = next(v for v in pod["volumes"] if v["name"] == "engines")
    assert engines == {"name": "engines", "persistentVolumeClaim": {"claimName": "samtriton-engines"}}
    assert _one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["containers"][0]["image"] == "registry.example.com/samtriton:gpu"
