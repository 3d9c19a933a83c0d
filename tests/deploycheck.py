"""Checks of the deploy files (deploy/k8s/*.yaml, deploy/compose.yaml) against Kubernetes and against our code.

Why it exists: deploy files are code nobody runs in CI, so they rot: a renamed flag, a port that no
longer matches, a model repository path the image does not have. These checks run offline:

* every Kubernetes object validates against the Kubernetes JSON schemas (``kubernetes-validate``,
  strict: an unknown field is an error);
* every flag a container passes to one of our programs (``python -m orchestrator | draft_service |
  target_service | specdec.probe | target_service.liveness``) or to ``tritonserver`` exists in that
  program's ``--help``;
* ports, names and images agree: a container listens where its flags say, probes and Services point at
  those ports (an exec probe at the gRPC port, with a client certificate where the port requires one),
  the orchestrator's pools name headless Services (or compose services) on the right ports,
  Triton's model repository is where its Dockerfile puts it, and compose and Kubernetes run each
  program from the same image.

Each check returns a list of problems (empty = fine), so a test can also show that a broken file fails.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.31"
PROGRAMS = ("orchestrator", "draft_service", "target_service", "specdec.probe", "target_service.liveness")
_FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def schema_errors(docs: Iterable[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name}: {path}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, KeyError) as exc:
            problems.append(f"{name}: no schema ({getattr(exc, 'message', exc)})")
    return problems


# --- programs and flags ---------------------------------------------------------------------------------------


def program_of(argv: list[str]) -> str | None:
    if argv[:1] in (["python"], ["python3"]) and argv[1:2] == ["-m"] and len(argv) > 2:
        return argv[2]
    if argv and argv[0] == "tritonserver":
        return "tritonserver"
    return None


def flags_of(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@functools.cache
def known_flags(program: str) -> frozenset[str]:
    """The flags ``program --help`` lists (ours run with this interpreter, tritonserver from the wheel)."""
    if program == "tritonserver":
        from target_service.config import TritonServerConfig
        from target_service.launcher import install_tritonserver, triton_env

        home = install_tritonserver(TritonServerConfig().cache_root)
        argv, env = [str(home / "bin" / "tritonserver"), "--help"], triton_env()
    else:
        argv, env = [sys.executable, "-m", program, "--help"], None
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)  # noqa: S603
    text = done.stdout + done.stderr
    flags = frozenset(_FLAG.findall(text))
    if "--help" not in flags and program != "tritonserver" or len(flags) < 3:
        raise RuntimeError(f"`{' '.join(argv)}` printed no usable help:\n{text[-2000:]}")
    return flags


def flag_errors(where: str, argv: list[str]) -> list[str]:
    program = program_of(argv)
    if program is None:
        return [f"{where}: {argv[:3]} runs none of our programs nor tritonserver"]
    if program not in (*PROGRAMS, "tritonserver"):
        return [f"{where}: unknown program {program!r}"]
    known = known_flags(program)
    return [f"{where}: {program} has no flag {flag}" for flag in flags_of(argv) if flag not in known]


# --- Kubernetes objects ---------------------------------------------------------------------------------------


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
        return []
    return doc["spec"]["template"]["spec"].get("containers", [])


def container_argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in [*container.get("command", []), *container.get("args", [])]]


def probe_argvs(container: dict[str, Any]) -> list[list[str]]:
    return [
        [str(a) for a in probe["exec"]["command"]]
        for key in ("readinessProbe", "livenessProbe", "startupProbe")
        if "exec" in (probe := container.get(key) or {})
    ]


def k8s_flag_errors(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        for c in pod_containers(doc):
            where = f"{doc['metadata']['name']}/{c['name']}"
            problems += flag_errors(where, container_argv(c))
            for argv in probe_argvs(c):
                problems += flag_errors(f"{where} probe", argv)
            for var in c.get("env", []):  # our SPECDEC_<SERVICE>_* variables stand for flags
                problems += env_errors(where, container_argv(c), var["name"])
    return problems


def env_errors(where: str, argv: list[str], name: str) -> list[str]:
    prefixes = {"orchestrator": "SPECDEC_ORCHESTRATOR_", "draft_service": "SPECDEC_DRAFT_", "target_service": "SPECDEC_TARGET_"}
    prefix = prefixes.get(program_of(argv) or "")
    if prefix is None or not name.startswith(prefix):
        return []
    flag = "--" + name[len(prefix) :].lower().replace("_", "-")
    return [] if flag in known_flags(program_of(argv) or "") else [f"{where}: env {name} is no flag ({flag})"]


def k8s_consistency_errors(docs: list[dict[str, Any]], triton_dockerfile: str) -> list[str]:
    problems = []
    deployments = [d for d in docs if pod_containers(d)]
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    repository = _dockerfile_model_repository(triton_dockerfile)
    for doc in deployments:
        name = doc["metadata"]["name"]
        template = doc["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        for c in pod_containers(doc):
            argv = container_argv(c)
            ports = {p["containerPort"] for p in c.get("ports", [])}
            program = program_of(argv)
            listens = {"tritonserver": ["--grpc-port", "--http-port", "--metrics-port"]}.get(
                program or "", ["--port", "--metrics-port"]
            )
            for flag in listens:
                value = flag_value(argv, flag)
                if value is not None and int(value) not in ports:
                    problems.append(f"{name}: {flag} {value} is not a containerPort {sorted(ports)}")
            metrics = flag_value(argv, "--metrics-port")
            if "prometheus.io/port" in annotations and metrics != annotations["prometheus.io/port"]:
                problems.append(f"{name}: prometheus.io/port {annotations['prometheus.io/port']} != --metrics-port {metrics}")
            grpc_port = _grpc_port(argv)
            for key in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(key) or {}
                port = (probe.get("grpc") or probe.get("httpGet") or {}).get("port")
                if port is not None and port not in ports:
                    problems.append(f"{name}: {key} port {port} is not a containerPort")
                if "grpc" in probe and str(port) != grpc_port:
                    problems.append(f"{name}: {key} probes gRPC on {port}, the server listens on {grpc_port}")
                if "exec" in probe:
                    command = [str(a) for a in probe["exec"]["command"]]
                    problems += [f"{name}: {key}: {p}" for p in exec_probe_errors(argv, command)]
            if program == "tritonserver" and flag_value(argv, "--model-repository") != repository:
                problems.append(f"{name}: --model-repository {flag_value(argv, '--model-repository')} but the "
                                f"Triton image has its models in {repository}")  # fmt: skip
            if program == "orchestrator":
                for flag in ("--draft-address", "--triton-url"):
                    problems += _pool_errors(name, flag, flag_value(argv, flag) or "", services, deployments)
    for service in services.values():
        target = _selected(service, deployments)
        if target is None:
            problems.append(f"Service {service['metadata']['name']}: selects no Deployment")
            continue
        ports = {p["containerPort"] for c in pod_containers(target) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if port.get("targetPort", port["port"]) not in ports:
                problems.append(f"Service {service['metadata']['name']}: port {port} reaches no containerPort")
    return problems


def _grpc_port(server: list[str]) -> str | None:
    return flag_value(server, "--grpc-port" if program_of(server) == "tritonserver" else "--port")


def exec_probe_errors(server: list[str], probe: list[str]) -> list[str]:
    """A probe command (``python3 -m <probe> ADDRESS ...``: a Kubernetes exec probe, a compose healthcheck)
    must ask the server's gRPC port, in the port's own TLS."""
    address, grpc_port = probe[3], _grpc_port(server)
    problems = _probe_tls_errors(server, probe)
    if address.rpartition(":")[2] != grpc_port:
        problems.insert(0, f"probes {address}, the server listens on {grpc_port}")
    return problems


def _probe_tls_errors(server: list[str], probe: list[str]) -> list[str]:
    """A probe of a TLS port must speak TLS, and present a certificate where the port requires one."""
    if program_of(server) == "tritonserver":
        tls = flag_value(server, "--grpc-use-ssl") == "true" or flag_value(server, "--grpc-use-ssl-mutual") == "true"
        mutual = flag_value(server, "--grpc-use-ssl-mutual") == "true"
    else:
        tls, mutual = flag_value(server, "--tls-cert") is not None, flag_value(server, "--tls-client-ca") is not None
    problems = []
    if tls != (flag_value(probe, "--tls-ca") is not None):
        problems.append("the probe's TLS (--tls-ca) does not match the server's port" + (" (TLS)" if tls else " (plaintext)"))
    if mutual and flag_value(probe, "--tls-cert") is None:
        problems.append("the server requires a client certificate, the probe presents none (--tls-cert)")
    return problems


def _selected(service: dict[str, Any], deployments: list[dict[str, Any]]) -> dict[str, Any] | None:
    selector = service["spec"].get("selector") or {}
    for doc in deployments:
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            return doc
    return None


def _pool_errors(where: str, flag: str, spec: str, services: dict, deployments: list) -> list[str]:
    problems = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        host, _, port = entry.removeprefix("dns:///").rpartition(":")
        service = services.get(host)
        if service is None:
            problems.append(f"{where}: {flag} names {host}, which is no Service here")
        elif service["spec"].get("clusterIP") != "None":
            problems.append(f"{where}: {flag} names {host}, which is not headless (the pool balances over its pods)")
        elif int(port) not in {p["port"] for p in service["spec"]["ports"]}:
            problems.append(f"{where}: {flag} uses port {port}, Service {host} has {service['spec']['ports']}")
    return problems


def _dockerfile_model_repository(dockerfile: str) -> str | None:
    found = re.findall(r"--model-repository=([^\"\s]+)", dockerfile)
    return found[-1] if found else None


# --- compose --------------------------------------------------------------------------------------------------


def compose_argvs(compose: dict[str, Any]) -> dict[str, list[str]]:
    argvs = {}
    for name, service in compose["services"].items():
        command = service.get("command", [])
        argvs[name] = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    return argvs


def compose_errors(compose: dict[str, Any], k8s: list[dict[str, Any]], triton_dockerfile: str) -> list[str]:
    problems = []
    argvs = compose_argvs(compose)
    repository = _dockerfile_model_repository(triton_dockerfile)
    for name, argv in argvs.items():
        problems += flag_errors(f"compose {name}", argv)
        test = (compose["services"][name].get("healthcheck") or {}).get("test", [])
        if test[:1] == ["CMD"] and program_of(test[1:]):
            command = [str(a) for a in test[1:]]
            problems += flag_errors(f"compose {name} healthcheck", command)
            problems += [f"compose {name}: healthcheck: {p}" for p in exec_probe_errors(argv, command)]
        if program_of(argv) == "tritonserver" and flag_value(argv, "--model-repository") != repository:
            problems.append(f"compose {name}: --model-repository is not the image's {repository}")
        if program_of(argv) == "orchestrator":
            for flag in ("--draft-address", "--triton-url"):
                for entry in filter(None, (flag_value(argv, flag) or "").split(",")):
                    host, _, port = entry.rpartition(":")
                    other = argvs.get(host)
                    listens = other and (flag_value(other, "--port") or flag_value(other, "--grpc-port"))
                    if listens != port:
                        problems.append(f"compose {name}: {flag} {entry}: {host} listens on {listens}")
    # The same program comes from the same image in compose and Kubernetes.
    def images(pairs: Iterable[tuple[str | None, str, str]]) -> set[tuple[str | None, str, str]]:
        return set(pairs)

    in_compose = images(
        (program_of(argvs[n]), flag_value(argvs[n], "--device") or "", s["image"]) for n, s in compose["services"].items()
    )
    in_k8s = images(
        (program_of(container_argv(c)), flag_value(container_argv(c), "--device") or "", c["image"].rpartition("/")[2])
        for doc in k8s for c in pod_containers(doc)
    )  # fmt: skip
    for program, device, image in sorted(in_compose ^ in_k8s, key=str):
        problems.append(f"image mismatch: {program} ({device or 'no device flag'}) runs {image} on only one side")
    return problems
