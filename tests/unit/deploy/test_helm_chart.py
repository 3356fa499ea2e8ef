"""The Helm chart, rendered offline (helm-python-sdk embeds Helm) for the CPU and NPU overlays.

Every manifest is validated against the Kubernetes JSON schemas (kubernetes-validate, strict, a fixed
Kubernetes version), the chart is linted strictly, and bad values must fail the values schema.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm  # helm-python-sdk (test extra)
import kubernetes_validate  # kubernetes-validate (test extra)
import pytest
import yaml

CHART = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "qwenvl-pd"
KUBE_VERSION = "1.34.0"
RELEASE, NAMESPACE = "qwenvl-pd", "serving"
ROLES = ("proxy", "prefill", "decode")
# CRDs that kubernetes-validate has no schema for; validated nowhere else, so skipped explicitly.
NO_SCHEMA_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_error(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart, pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(info.value)


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def workload(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (dep,) = find(docs, "Deployment", f"{RELEASE}-{role}")
    return dep


def container(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (c,) = workload(docs, role)["spec"]["template"]["spec"]["containers"]
    return c


def arg(c: dict[str, Any], flag: str) -> str:
    args = c["args"]
    return args[args.index(flag) + 1]


def fqdn(role: str) -> str:
    return f"{RELEASE}-{role}.{NAMESPACE}.svc.cluster.local"


@pytest.fixture(scope="module")
def cpu_values() -> dict[str, Any]:
    return load_values("values-cpu.yaml")


@pytest.fixture(scope="module")
def cpu(cpu_values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(cpu_values)


@pytest.fixture(scope="module")
def npu() -> list[dict[str, Any]]:
    return render(load_values("values-npu.yaml"))


# --- schema validation and lint -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "npu"])
def test_every_manifest_validates_against_kubernetes_schemas(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    kinds = sorted({d["kind"] for d in docs})
    validated = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NO_SCHEMA_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        validated.append(doc["kind"])
    expected = {"cpu": ["Deployment", "NetworkPolicy", "Service"],
                "npu": ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "Service",
                        "ServiceMonitor"]}[overlay]
    assert kinds == expected
    assert validated.count("Deployment") == 3 and validated.count("Service") == 3


def test_servicemonitor_schema_is_really_unknown_to_kubernetes_validate(npu: list[dict[str, Any]]) -> None:
    (sm,) = find(npu, "ServiceMonitor")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(sm, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["values-cpu.yaml", "values-npu.yaml"])
def test_strict_lint_passes(overlay: str) -> None:
    report = helm.lint(CHART, load_values(overlay), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_of_bare_defaults_demands_a_model_source() -> None:
    report = helm.lint(CHART, None, strict=True)
    assert any("missing property 'source'" in e for e in report["errors"])


# --- workloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "npu"])
def test_each_role_is_a_deployment_with_its_args(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    assert sorted(d["metadata"]["name"] for d in find(docs, "Deployment")) == [
        f"{RELEASE}-decode", f"{RELEASE}-prefill", f"{RELEASE}-proxy"]
    model, served, proto, device = {
        "cpu": ("/models/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-3b", "tcp", "cpu"),
        "npu": ("/models/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b", "ascend", "npu"),
    }[overlay]
    assert container(docs, "prefill")["args"] == [
        "prefill", "--port", "50051", "--model", model, "--transfer-protocol", proto, "--device", device,
        "--tensor-parallel-size", "1"]
    assert container(docs, "decode")["args"] == [
        "decode", "--port", "50052", "--model", model, "--transfer-protocol", proto, "--device", device,
        "--tensor-parallel-size", "1"]
    assert container(docs, "proxy")["args"] == [
        "proxy", "--port", "8000",
        "--discover-dns", f"prefill={fqdn('prefill')}:50051,decode={fqdn('decode')}:50052",
        "--served-model-name", served]
    for role in ROLES:
        c = container(docs, role)
        assert c["name"] == role
        assert c["image"] == f"qwenvl-pd:0.1.0-{'cpu' if overlay == 'cpu' else 'ascend'}"


def test_discover_dns_names_the_headless_services(cpu: list[dict[str, Any]]) -> None:
    from qwenvl_pd.proxy.cluster.discovery import parse_discover_dns

    targets = parse_discover_dns(arg(container(cpu, "proxy"), "--discover-dns"))
    for role in ("prefill", "decode"):
        host, port = targets[role]
        (svc,) = find(cpu, "Service", host.split(".")[0])
        assert svc["spec"]["clusterIP"] == "None"
        assert host == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert port == svc["spec"]["ports"][0]["port"] == container(cpu, role)["ports"][0]["containerPort"]


@pytest.mark.parametrize("overlay", ["cpu", "npu"])
def test_probes(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    proxy = container(docs, "proxy")
    # only readiness follows the backends: an outage must not restart every proxy
    for kind, path in (("startupProbe", "/live"), ("readinessProbe", "/health"), ("livenessProbe", "/live")):
        assert proxy[kind]["httpGet"] == {"path": path, "port": "http"}
    assert proxy["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for role, port in (("prefill", 50051), ("decode", 50052)):
        c = container(docs, role)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["grpc"] == {"port": port}
            assert "httpGet" not in c[kind]
        # a long startup window for model loading: 30 minutes before the first restart
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 1800
        assert c["livenessProbe"]["failureThreshold"] == 3


def test_accelerator_resource_npu_and_none_on_cpu(cpu: list[dict[str, Any]], npu: list[dict[str, Any]]) -> None:
    for role in ("prefill", "decode"):
        assert container(npu, role)["resources"]["limits"]["huawei.com/Ascend910"] == 1
        for docs in (cpu, npu):
            limits = container(docs, role)["resources"].get("limits", {})
            assert not any("gpu" in k for k in limits)
        assert not any("/" in k for k in container(cpu, role)["resources"]["limits"])
    for docs in (cpu, npu):
        assert not any("/" in k for k in container(docs, "proxy")["resources"].get("limits", {}))


def test_gpu_settings(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["transfer"] = {"protocol": "rdma"}
    for role in ("prefill", "decode"):
        values[role]["device"] = "cuda"
        values[role]["accelerator"] = {"resource": "nvidia.com/gpu", "count": 2}
    docs = render(values)
    for role in ("prefill", "decode"):
        c = container(docs, role)
        assert c["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": 2}
        assert arg(c, "--device") == "cuda" and arg(c, "--transfer-protocol") == "rdma"
        kubernetes_validate.validate(workload(docs, role), KUBE_VERSION, strict=True)


def test_npu_scheduling_and_host_volumes(npu: list[dict[str, Any]]) -> None:
    for role in ("prefill", "decode"):
        pod = workload(npu, role)["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
        assert pod["tolerations"][0]["key"] == "huawei.com/Ascend910"
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model"]["hostPath"] == {"path": "/data/models", "type": "Directory"}
        assert "ascend-driver" in volumes
    assert "hostNetwork" not in workload(npu, "proxy")["spec"]["template"]["spec"]


# --- volumes ---------------------------------------------------------------------------------------


def test_shm_and_model_volumes(cpu: list[dict[str, Any]]) -> None:
    for role in ("prefill", "decode"):
        pod = workload(cpu, role)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "qwenvl-models", "readOnly": True}
        mounts = {m["name"]: m for m in container(cpu, role)["volumeMounts"]}
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
    # The proxy needs no weights (it asks prefill for the tokenizer).
    assert [v["name"] for v in workload(cpu, "proxy")["spec"]["template"]["spec"]["volumes"]] == ["tmp"]


def test_image_baked_model_mounts_nothing(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["model"] = {"source": "image", "path": "/opt/model", "servedModelName": "m"}
    docs = render(values)
    for role in ("prefill", "decode"):
        assert arg(container(docs, role), "--model") == "/opt/model"
        names = [v["name"] for v in workload(docs, role)["spec"]["template"]["spec"]["volumes"]]
        assert names == ["dshm"]


# --- services, autoscaling, monitoring ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "npu"])
def test_services(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    for role, port in (("prefill", 50051), ("decode", 50052)):
        (svc,) = find(docs, "Service", f"{RELEASE}-{role}")
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is False
        assert svc["spec"]["ports"] == [{"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"}]
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == role
    (proxy,) = find(docs, "Service", f"{RELEASE}-proxy")
    assert proxy["spec"]["type"] == "ClusterIP" and "clusterIP" not in proxy["spec"]
    assert proxy["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert proxy["spec"]["selector"]["app.kubernetes.io/component"] == "proxy"
    for role in ROLES:  # each Service selects exactly its role's pods
        (svc,) = find(docs, "Service", f"{RELEASE}-{role}")
        labels = workload(docs, role)["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()


def test_autoscaling_replaces_fixed_replicas(cpu: list[dict[str, Any]], npu: list[dict[str, Any]]) -> None:
    assert find(cpu, "HorizontalPodAutoscaler") == []
    assert [workload(cpu, r)["spec"]["replicas"] for r in ROLES] == [1, 1, 1]
    (hpa,) = find(npu, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == f"{RELEASE}-decode"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-decode"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in workload(npu, "decode")["spec"]
    assert workload(npu, "prefill")["spec"]["replicas"] == 2


def test_servicemonitor_only_when_enabled(cpu: list[dict[str, Any]], npu: list[dict[str, Any]]) -> None:
    assert find(cpu, "ServiceMonitor") == []
    (sm,) = find(npu, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "proxy"


# --- bad values fail at install time --------------------------------------------------------------------


def test_unknown_role_key_fails(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["encoder"] = {"replicas": 1}
    assert "additional properties 'encoder' not allowed" in render_error(values)


def test_unknown_key_inside_a_role_fails(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["decode"]["replica"] = 2
    error = render_error(values)
    assert "/decode" in error and "'replica' not allowed" in error


def test_negative_replicas_fail(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["prefill"]["replicas"] = -1
    error = render_error(values)
    assert "/prefill/replicas" in error and "minimum" in error


def test_missing_model_source_fails(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    del values["model"]["source"]
    error = render_error(values)
    assert "/model" in error and "missing property 'source'" in error


@pytest.mark.parametrize("model, fragment", [
    ({"source": "pvc", "pvc": {"claimName": ""}}, "/model/pvc/claimName"),
    ({"source": "hostPath", "hostPath": {"path": ""}}, "/model/hostPath/path"),
    ({"source": "s3"}, "/model/source"),
])
def test_incomplete_model_source_fails(cpu_values: dict[str, Any], model: dict[str, Any], fragment: str) -> None:
    values = copy.deepcopy(cpu_values)
    values["model"] = {"path": "/models", "servedModelName": "m", **model}
    assert fragment in render_error(values)


@pytest.mark.parametrize("role, key, value, fragment", [
    ("prefill", "device", "tpu", "/prefill/device"),
    ("decode", "accelerator", {"resource": "not a resource", "count": 1}, "/decode/accelerator/resource"),
    ("decode", "accelerator", {"resource": "huawei.com/Ascend910", "count": 0}, "/decode/accelerator/count"),
    ("proxy", "port", 70000, "/proxy/port"),
    ("proxy", "probes", {"startup": {"failureThreshold": 0}, "readiness": {}, "liveness": {}},
     "/proxy/probes/startup/failureThreshold"),
])
def test_bad_role_values_fail(cpu_values: dict[str, Any], role: str, key: str, value: Any, fragment: str) -> None:
    values = copy.deepcopy(cpu_values)
    values.setdefault(role, {})[key] = value
    assert fragment in render_error(values)


def test_unknown_transfer_protocol_fails(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["transfer"] = {"protocol": "udp"}
    assert "/transfer/protocol" in render_error(values)


def test_tensor_parallel_size_and_expert_parallel_reach_the_args(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["enableExpertParallel"] = True
    for role in ("prefill", "decode"):
        values[role].update(device="cuda", tensorParallelSize=8,
                            accelerator={"resource": "nvidia.com/gpu", "count": 8})
    docs = render(values)
    for role in ("prefill", "decode"):
        c = container(docs, role)
        assert arg(c, "--tensor-parallel-size") == "8" and "--enable-expert-parallel" in c["args"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert "--tensor-parallel-size" not in container(docs, "proxy")["args"]


def test_fewer_accelerators_than_ranks_fails_the_render(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["decode"].update(tensorParallelSize=4, accelerator={"resource": "nvidia.com/gpu", "count": 2})
    with pytest.raises(Exception, match=r"decode: accelerator.count \(2\) must be at least tensorParallelSize \(4\)"):
        render(values)


def test_the_235b_overlay_runs_tp8_ep_pods_of_8_npus() -> None:
    values = load_values("values-npu.yaml")
    for key, value in load_values("values-qwen3-vl-235b.yaml").items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    docs = render(values)
    for role in ("prefill", "decode"):
        c = container(docs, role)
        assert arg(c, "--tensor-parallel-size") == "8" and "--enable-expert-parallel" in c["args"]
        assert c["resources"]["limits"]["huawei.com/Ascend910"] == 8
        assert arg(c, "--model") == "/models/Qwen3-VL-235B-A22B-Instruct"


def test_engines_admit_only_the_releases_pods_and_nothing_escalates(cpu: list[dict[str, Any]]) -> None:
    policies = {d["metadata"]["name"]: d for d in find(cpu, "NetworkPolicy")}
    assert sorted(policies) == [f"{RELEASE}-decode", f"{RELEASE}-prefill"]
    for role in ("prefill", "decode"):
        spec = policies[f"{RELEASE}-{role}"]["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
        assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "qwenvl-pd", "app.kubernetes.io/instance": RELEASE}}}]}]
        assert container(cpu, role)["securityContext"]["allowPrivilegeEscalation"] is False
    proxy = container(cpu, "proxy")
    assert proxy["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert {"name": "tmp", "mountPath": "/tmp"} in proxy["volumeMounts"]


def test_cluster_secret_reaches_every_role_and_the_api_key_the_proxy(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["clusterSecret"] = {"existingSecret": "qwenvl-cluster", "key": "secret"}
    values.setdefault("proxy", {})["apiKeySecret"] = {"name": "qwenvl-api", "key": "api-key"}
    docs = render(values)
    for role in ROLES:
        env = {e["name"]: e for e in container(docs, role).get("env", [])}
        assert env["QWENVL_PD_CLUSTER_SECRET"]["valueFrom"] == {
            "secretKeyRef": {"name": "qwenvl-cluster", "key": "secret"}}
        assert ("QWENVL_PD_API_KEY" in env) == (role == "proxy")
    proxy_env = {e["name"]: e for e in container(docs, "proxy")["env"]}
    assert proxy_env["QWENVL_PD_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "qwenvl-api", "key": "api-key"}
    for role in ROLES:
        kubernetes_validate.validate(workload(docs, role), KUBE_VERSION, strict=True)


def test_host_network_engines_need_the_cluster_secret(npu: list[dict[str, Any]]) -> None:
    # hostNetwork pods are outside every NetworkPolicy: authentication is all that guards their ports
    for role in ("prefill", "decode"):
        env = {e["name"]: e for e in container(npu, role)["env"]}
        assert env["QWENVL_PD_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "qwenvl-cluster", "key": "secret"}
    values = load_values("values-npu.yaml")
    values["clusterSecret"]["existingSecret"] = ""
    assert "prefill.hostNetwork puts its ports outside any NetworkPolicy: set clusterSecret.existingSecret" \
        in render_error(values)


# --- the encode role (EPD) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def epd(cpu_values: dict[str, Any]) -> list[dict[str, Any]]:
    values = copy.deepcopy(cpu_values)
    values["encode"].update(enabled=True, embeddingCacheGiB=2.5, embeddingStore="mooncake-master.serving:50051",
                            autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3,
                                         "targetCPUUtilizationPercentage": 75})
    values["clusterSecret"] = {"existingSecret": "qwenvl-cluster", "key": "secret"}
    return render(values)


@pytest.mark.parametrize("overlay", ["cpu", "npu"])
def test_encode_role_is_off_by_default(overlay: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(overlay)
    assert [d["metadata"]["name"] for d in docs if d["metadata"]["name"].endswith("-encode")] == []
    assert "encode=" not in arg(container(docs, "proxy"), "--discover-dns")
    assert "--embedding-store" not in container(docs, "prefill")["args"]


def test_encode_role_when_enabled(epd: list[dict[str, Any]]) -> None:
    from qwenvl_pd.proxy.cluster.discovery import parse_discover_dns

    assert container(epd, "encode")["args"] == [
        "encode", "--port", "50053", "--model", "/models/Qwen2.5-VL-3B-Instruct", "--transfer-protocol", "tcp",
        "--device", "cpu", "--embedding-cache-gib", "2.5", "--embedding-store", "mooncake-master.serving:50051"]
    assert parse_discover_dns(arg(container(epd, "proxy"), "--discover-dns")) == {
        "prefill": (fqdn("prefill"), 50051), "decode": (fqdn("decode"), 50052), "encode": (fqdn("encode"), 50053)}
    assert container(epd, "prefill")["args"][-2:] == ["--embedding-store", "mooncake-master.serving:50051"]
    assert "--embedding-store" not in container(epd, "decode")["args"]
    c = container(epd, "encode")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["grpc"] == {"port": 50053}
    assert c["ports"] == [{"name": "grpc", "containerPort": 50053, "protocol": "TCP"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["QWENVL_PD_CLUSTER_SECRET"]["valueFrom"] == {"secretKeyRef": {"name": "qwenvl-cluster", "key": "secret"}}
    assert {m["name"] for m in c["volumeMounts"]} == {"model", "dshm"}  # the vision weights are the model's
    (svc,) = find(epd, "Service", f"{RELEASE}-encode")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 50053, "targetPort": "grpc", "protocol": "TCP"}]
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "encode"
    (hpa,) = find(epd, "HorizontalPodAutoscaler", f"{RELEASE}-encode")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    assert "replicas" not in workload(epd, "encode")["spec"]
    for doc in epd:
        if (doc["apiVersion"], doc["kind"]) not in NO_SCHEMA_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_encode_admits_the_proxy_on_grpc_and_prefill(epd: list[dict[str, Any]]) -> None:
    (policy,) = find(epd, "NetworkPolicy", f"{RELEASE}-encode")
    release = {"app.kubernetes.io/name": "qwenvl-pd", "app.kubernetes.io/instance": RELEASE}
    assert policy["spec"]["podSelector"]["matchLabels"] == {**release, "app.kubernetes.io/component": "encode"}
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {**release, "app.kubernetes.io/component": "proxy"}}}],
         "ports": [{"port": "grpc", "protocol": "TCP"}]},
        {"from": [{"podSelector": {"matchLabels": {**release, "app.kubernetes.io/component": "prefill"}}}]}]


def test_encode_values_lint_and_bad_ones_fail(cpu_values: dict[str, Any]) -> None:
    values = copy.deepcopy(cpu_values)
    values["encode"]["enabled"] = True
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    for key, value, fragment in (("embeddingCacheGiB", 0, "/encode/embeddingCacheGiB"),
                                 ("embeddingStore", "no-port", "/encode/embeddingStore"),
                                 ("tensorParallelSize", 2, "'tensorParallelSize' not allowed")):
        bad = copy.deepcopy(values)
        bad["encode"][key] = value
        assert fragment in render_error(bad)
