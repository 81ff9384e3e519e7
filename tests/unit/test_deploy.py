"""deploy/ checked without a container engine: the compose file against the compose specification, the
Kubernetes manifests against the Kubernetes API schemas (offline, kubernetes-validate), and consistency across
files: every CL_SERVICE_* variable names a real setting, the dashboard and Prometheus ask for metrics the service
exports, probes and scrape targets use the ports the service listens on."""

from __future__ import annotations

import inspect
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]

from cl_service.config import Settings
from cl_service.metrics import ServiceMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30.0"
ENV_NAME = re.compile(r"\bCL_SERVICE_[A-Z_]+\b")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_compose_file_follows_the_compose_specification() -> None:
    schema_text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(schema_text)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    assert set(compose["services"]) == {"cl-service", "postgres", "prometheus", "grafana"}
    assert compose["services"]["cl-service"]["build"]["target"] in _docker_targets()


@pytest.mark.parametrize("path", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_follow_the_api_schemas(path: Path) -> None:
    for document in _documents(path):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_probes_and_ports_agree() -> None:
    (deployment,) = _documents(DEPLOY / "k8s" / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (config,) = _documents(DEPLOY / "k8s" / "configmap.yaml")
    grpc_port = int(config["data"]["CL_SERVICE_BIND"].rsplit(":", 1)[1])
    metrics_port = int(config["data"]["CL_SERVICE_METRICS_BIND"].rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port  # gRPC health, open without a token
    assert {p["containerPort"] for p in container["ports"]} == {grpc_port, metrics_port}
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [f"cl-service:{metrics_port}"]


def test_every_environment_variable_names_a_setting() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    for path in [DEPLOY / "Dockerfile", DEPLOY / "compose.yaml", *sorted((DEPLOY / "k8s").glob("*.yaml"))]:
        for name in ENV_NAME.findall(path.read_text()):
            assert name.removeprefix("CL_SERVICE_") in fields, f"{path.name}: {name} is not a setting"


def test_the_dashboard_asks_for_metrics_the_service_exports() -> None:
    exported = set(re.findall(r'"(cl_[a-z_]+)"', Path(inspect.getfile(ServiceMetrics)).read_text()))
    series = {f"{name}{suffix}" for name in exported for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "cl-service.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bcl_[a-z_]+\b", target["expr"])
    }
    assert used and used <= series, used - series


def _docker_targets() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE))


def test_the_dockerfile_has_cpu_and_cuda_targets() -> None:
    assert _docker_targets() == {"cpu", "cuda"}
