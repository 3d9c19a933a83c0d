"""The deploy files are checked (tests/deploycheck.py): Kubernetes schemas, flags, ports, names and images.

Each check also gets a broken file, to show it fails on it (a check that cannot fail checks nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploycheck import ROOT, compose_errors, k8s_consistency_errors, k8s_flag_errors, load_all, schema_errors

MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
TRITON_DOCKERFILE = (ROOT / "deploy" / "triton" / "Dockerfile").read_text()


def test_there_are_a_plaintext_and_an_mtls_manifest() -> None:
    assert [p.name for p in MANIFESTS] == ["specdec-mtls.yaml", "specdec.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_object_validates_against_the_kubernetes_schemas(path: Path) -> None:
    docs = load_all(path.read_text())
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    assert schema_errors(docs) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_flag_exists_and_ports_names_and_paths_agree(path: Path) -> None:
    docs = load_all(path.read_text())
    assert k8s_flag_errors(docs) == []
    assert k8s_consistency_errors(docs, TRITON_DOCKERFILE) == []


def test_compose_uses_real_flags_and_the_images_kubernetes_uses() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    k8s = load_all((ROOT / "deploy" / "k8s" / "specdec.yaml").read_text())
    assert compose_errors(compose, k8s, TRITON_DOCKERFILE) == []


def test_the_pools_are_headless_and_resources_separate_big_gpu_small_gpu_and_cpu() -> None:
    docs = load_all((ROOT / "deploy" / "k8s" / "specdec.yaml").read_text())
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    headless = {d["metadata"]["name"] for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"}
    assert headless == {"specdec-triton", "specdec-draft", "specdec-draft-cpu"}

    def requests(name: str) -> dict:
        return by_name[name]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]

    def node(name: str) -> str:
        return by_name[name]["spec"]["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product", "")

    assert requests("specdec-triton")["nvidia.com/gpu"] == 1 and "H100" in node("specdec-triton")
    assert requests("specdec-draft")["nvidia.com/gpu"] == 1 and "L4" in node("specdec-draft")
    for cpu_only in ("specdec-draft-cpu", "specdec-orchestrator"):
        assert "nvidia.com/gpu" not in requests(cpu_only) and not node(cpu_only)


# --- the checks fail on broken files --------------------------------------------------------------------------

BROKEN_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: { name: broken }
spec:
  selector: { matchLabels: { app: broken } }
  template:
    metadata: { labels: { app: broken } }
    spec:
      containers:
        - name: draft
          image: specdec:cpu
          args: ["python", "-m", "draft_service", "--port", "50052", "--max-sequence", "8"]
          ports: [{ containerPort: "50052" }]
          readinessProbes: { grpc: { port: 50052 } }
---
apiVersion: v1
kind: Service
metadata: { name: broken }
spec:
  selector: { app: broken }
  ports: [{ port: 50053 }]
"""


def test_the_checks_catch_a_wrong_field_a_wrong_flag_and_a_wrong_port() -> None:
    docs = load_all(BROKEN_DEPLOYMENT)
    assert schema_errors(docs) == [  # the validator reports the first error of each object
        "Deployment/broken: spec.template.spec.containers.0.ports.0.containerPort: '50052' is not of type 'integer'"
    ]
    port_fixed = load_all(BROKEN_DEPLOYMENT.replace('"50052" }', "50052 }"))
    errors = schema_errors(port_fixed)  # then the unknown field (the schemas are strict)
    assert len(errors) == 1 and errors[0].startswith("Deployment/broken: spec.template.spec.containers.0: ")
    assert "'readinessProbes' was unexpected" in errors[0], errors
    assert k8s_flag_errors(docs) == ["broken/draft: draft_service has no flag --max-sequence"]
    assert k8s_consistency_errors(port_fixed, TRITON_DOCKERFILE) == [
        "Service broken: port {'port': 50053} reaches no containerPort"
    ]


def test_the_checks_catch_a_pool_that_is_not_headless_and_a_model_repository_the_image_lacks() -> None:
    text = (ROOT / "deploy" / "k8s" / "specdec.yaml").read_text()
    broken = text.replace("clusterIP: None            # headless", "clusterIP: 10.0.0.10  # not headless")
    broken = broken.replace('"--model-repository=/models"', '"--model-repository=/models/repository"')
    errors = k8s_consistency_errors(load_all(broken), TRITON_DOCKERFILE)
    assert errors == [
        "specdec-triton: --model-repository /models/repository but the Triton image has its models in /models",
        "specdec-orchestrator: --triton-url names specdec-triton, which is not headless (the pool balances over its pods)",
    ]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text().replace("--draft-address draft:50052", "--draft-address draft:50099"))
    assert compose_errors(compose, load_all(text), TRITON_DOCKERFILE) == [
        "compose orchestrator: --draft-address draft:50099: draft listens on 50052"
    ]


def test_the_checks_catch_a_triton_liveness_probe_at_the_wrong_port_without_its_certificate_or_flag() -> None:
    text = (ROOT / "deploy" / "k8s" / "specdec-mtls.yaml").read_text()
    probe = '"target_service.liveness", "127.0.0.1:8001", "--timeout-s", "20", "--dump-stacks", "--tls-ca", "/etc/specdec/tls/ca.crt", "--tls-cert", "/etc/specdec/tls/tls.crt", "--tls-key", "/etc/specdec/tls/tls.key"'
    assert probe in text
    broken = text.replace(probe, '"target_service.liveness", "127.0.0.1:8000", "--timeout", "20", "--tls-ca", "/etc/specdec/tls/ca.crt"')
    docs = load_all(broken)
    assert k8s_consistency_errors(docs, TRITON_DOCKERFILE) == [
        "specdec-triton: livenessProbe: probes 127.0.0.1:8000, the server listens on 8001",
        "specdec-triton: livenessProbe: the server requires a client certificate, the probe presents none (--tls-cert)",
    ]
    assert k8s_flag_errors(docs) == ["specdec-triton/triton probe: target_service.liveness has no flag --timeout"]
    plaintext = load_all(text.replace('"--tls-ca", "/etc/specdec/tls/ca.crt", "--tls-cert", "/etc/specdec/tls/tls.crt", "--tls-key", "/etc/specdec/tls/tls.key", "--server-name", "specdec-triton"', ""))
    assert "specdec-triton: livenessProbe: the probe's TLS (--tls-ca) does not match the server's port (TLS)" in (
        k8s_consistency_errors(plaintext, TRITON_DOCKERFILE))


def test_the_checks_catch_a_compose_healthcheck_at_the_wrong_port_or_with_a_wrong_flag() -> None:
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    probe = '"target_service.liveness", "127.0.0.1:8001", "--timeout-s", "20"'
    assert probe in text
    broken = text.replace(probe, '"target_service.liveness", "127.0.0.1:8000", "--timeout", "20"')
    broken = broken.replace('"specdec.probe", "127.0.0.1:50052"', '"specdec.probe", "127.0.0.1:50053"', 1)
    k8s = load_all((ROOT / "deploy" / "k8s" / "specdec.yaml").read_text())
    assert compose_errors(yaml.safe_load(broken), k8s, TRITON_DOCKERFILE) == [
        "compose triton healthcheck: target_service.liveness has no flag --timeout",
        "compose triton: healthcheck: probes 127.0.0.1:8000, the server listens on 8001",
        "compose draft: healthcheck: probes 127.0.0.1:50053, the server listens on 50052",
    ]
