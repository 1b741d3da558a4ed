"""Issues 13 and 11: the deployment files are valid (Prometheus rules, Grafana dashboard,
container image, systemd unit, the compose fleet, the Kubernetes manifests), checked with
the real tools where they exist."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

from certstore import generate_key_text
from certstore.crypto import load_key
from proxy.app.cli import main as cli_main
from proxy.app.config import Config, load_config, parse_address, require_serving
from proxy.app.health import OPS_PATHS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus; deploy/bootstrap.sh --test)"
        )
    return promtool


def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(PROMETHEUS / "linkedge-alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_alert_rules_fire_as_intended() -> None:
    """promtool's unit tests: expiring certificate, backend down, breaker open > 10 min."""
    result = subprocess.run(
        [_promtool(), "test", "rules", "linkedge-alerts.test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_cover_what_operators_page_on() -> None:
    rules = (PROMETHEUS / "linkedge-alerts.yml").read_text()
    alerts = set(re.findall(r"- alert: (\w+)", rules))
    assert {
        "LinkedgeCertificateExpiringSoon",
        "LinkedgeRenewalsFailing",
        "LinkedgeCABreakerOpen",
        "LinkedgeHandshakeRefusalsSpiking",
        "LinkedgeBackendDown",
    } <= alerts


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads((PROMETHEUS / "linkedge-dashboard.json").read_text())
    assert dashboard["title"] == "linkedge" and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert "linkedge_" in target["expr"]


# -- container image -------------------------------------------------------------

CONTAINERFILE = DEPLOY / "Containerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_containerfile_is_multi_stage_non_root_with_a_store_volume() -> None:
    steps = instructions(CONTAINERFILE.read_text())
    assert sum(1 for word, _ in steps if word == "FROM") >= 2
    final = final_stage(steps)
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(word == "VOLUME" and "/var/lib/linkedge" in args for word, args in final)
    exposed = {p for word, args in final if word == "EXPOSE" for p in args.split()}
    assert {"80", "443"} <= exposed
    # the runtime stage takes only the built virtualenv from the build stage
    assert any(word == "COPY" and "--from=build" in args for word, args in final)
    assert not any(word == "RUN" and "pip install" in args for word, args in final)
    env = " ".join(args for word, args in final if word == "ENV")
    assert "/var/lib/linkedge/" in env  # the store on the volume


SECRETISH = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|HMAC)", re.I)


def test_containerfile_bakes_in_no_secrets() -> None:
    steps = instructions(CONTAINERFILE.read_text())
    for word, args in steps:
        if word in ("ENV", "ARG"):
            for name, _, value in (
                part.partition("=") for part in shlex.split(args) if "=" in part
            ):
                assert not (SECRETISH.search(name) and value), f"{word} {name} bakes in a secret"
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.(key|token|pem|db)\b", args), args
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[0] == "*" or "*" in ignore  # only what is named gets into the context
    for pattern in ("**/*.key", "**/*.token", "**/*.db"):
        assert pattern in ignore


def _builder() -> list[str] | None:
    for tool in ("podman", "buildah"):
        if shutil.which(tool):
            return [tool, "build" if tool == "podman" else "bud"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "build"]
    return None


def test_containerfile_builds() -> None:
    builder = _builder()
    if builder is None:
        pytest.skip("no usable image builder (podman, buildah, or docker with a daemon)")
    result = subprocess.run(
        [*builder, "-f", str(CONTAINERFILE), "-t", "linkedge-test:latest", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# -- systemd unit ------------------------------------------------------------------

UNIT = DEPLOY / "linkedge.service"


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_hardened() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["User"] == ["linkedge"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["StateDirectory"] == ["linkedge"]
    assert s["PrivateTmp"] == ["yes"] and s["ProtectHome"] == ["yes"]
    assert "AF_INET AF_INET6 AF_UNIX" in s["RestrictAddressFamilies"]
    assert any(v.startswith("@system-service") for v in s["SystemCallFilter"])
    # the store path is inside the state directory systemd makes writable
    assert "LINKEDGE_STORE_PATH=/var/lib/linkedge/linkedge.db" in s["Environment"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists: point it at this checkout's virtualenv
    unit = tmp_path / "linkedge.service"
    unit.write_text(UNIT.read_text().replace("/opt/linkedge", str(ROOT)))
    if not (ROOT / ".venv" / "bin" / "linkedge").exists():
        pytest.skip("no .venv/bin/linkedge (deploy/bootstrap.sh)")
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "linkedge.service" not in result.stderr, result.stderr  # no warnings about it


# -- a fleet: compose and Kubernetes (issue 11) -------------------------------------
# The files are parsed and cross-checked: the configs load and pass `serve`'s checks
# with linkedge's own loader, on the environment the image and the manifests give them,
# and every name one file uses (ports, paths, labels, addresses) is one another defines.

COMPOSE_DIR = DEPLOY / "compose"
KUBE_DIR = DEPLOY / "kubernetes"
FLEET = COMPOSE_DIR / "fleet.py"
SECRET_BYTES = "s" * 32  # any secret file's stand-in: long enough for read_secret


def _yaml(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} has no document"
    return docs


def _image_env() -> dict[str, str]:
    """What deploy/Containerfile's runtime stage puts in every container's environment."""
    env: dict[str, str] = {}
    for word, args in final_stage(instructions(CONTAINERFILE.read_text())):
        if word == "ENV":
            for part in shlex.split(args):
                name, _, value = part.partition("=")
                env[name] = value
    return env


def _serving_config(text: str, environ: dict[str, str], tmp_path: Path, secrets_dir: str) -> Config:
    """load_config + require_serving on `text`, its secret files materialised in tmp_path."""
    local = tmp_path / "secrets"
    local.mkdir(exist_ok=True)
    for name in re.findall(re.escape(secrets_dir) + r"/([\w.-]+)", text):
        (local / name).write_text(SECRET_BYTES)
    path = tmp_path / "linkedge.toml"
    path.write_text(text.replace(secrets_dir, str(local)))
    config = load_config(path, environ=environ)
    require_serving(config)
    return config


def _port(address: str) -> int:
    return parse_address(address, "test")[1]


# -- Kubernetes --


def _kube() -> dict[str, dict[str, Any]]:
    """Every manifest by kind (one of each, except the two Services: 'Service/<name>')."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml(path):
            key = doc["kind"] if doc["kind"] != "Service" else f"Service/{doc['metadata']['name']}"
            assert key not in found, f"{key} twice"
            found[key] = doc
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _deployment_env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(deployment).get("env", [])}


def _kube_config(tmp_path: Path) -> tuple[Config, dict[str, dict[str, Any]]]:
    manifests = _kube()
    deployment = manifests["Deployment"]
    text = manifests["ConfigMap"]["data"]["linkedge.toml"]
    environ = {**_image_env(), **_deployment_env(deployment)}
    return _serving_config(text, environ, tmp_path, _secret_mount(deployment)), manifests


def _secret_mount(deployment: dict[str, Any]) -> str:
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = [m for m in _container(deployment)["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert len(mounts) == 1
    return str(mounts[0]["mountPath"])


def test_kubernetes_manifests_parse_and_share_one_namespace() -> None:
    manifests = _kube()
    assert set(manifests) == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service/linkedge",
        "Service/linkedge-metrics",
        "PodDisruptionBudget",
    }
    for key, doc in manifests.items():
        assert doc["apiVersion"] and doc["metadata"]["name"], key
        if key != "Namespace":
            assert doc["metadata"]["namespace"] == manifests["Namespace"]["metadata"]["name"]
    # no PostgreSQL in the manifests: operators bring a managed or replicated one
    assert "postgres" not in {doc["metadata"]["name"] for doc in manifests.values()}


def test_kustomization_applies_everything_but_the_secret_placeholders() -> None:
    (kustomization,) = _yaml(KUBE_DIR / "kustomization.yaml")
    files = {p.name for p in KUBE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    # placeholders applied over the real Secret would lock every pod out of the store
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}


def test_kubectl_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (kustomize build runs offline)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE_DIR)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Service", "Service", "PodDisruptionBudget"]
    )


def test_configmap_config_loads_and_passes_serve_checks(tmp_path: Path) -> None:
    config, _ = _kube_config(tmp_path)
    assert config.store.url.startswith("postgresql://")
    # behind the L4 balancer: PROXY protocol on both listeners, from named networks only
    assert config.listen.https_proxy_protocol and config.listen.http_proxy_protocol
    assert config.listen.proxy_protocol_trusted
    assert config.admin.listen.startswith("127.0.0.1:")  # the API stays inside the pod
    assert config.metrics.listen and config.workers >= 1


def test_deployment_ports_and_probes_match_the_config(tmp_path: Path) -> None:
    config, manifests = _kube_config(tmp_path)
    deployment = manifests["Deployment"]
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # the effective listeners: image env, then the Deployment's env, over the ConfigMap
    assert ports == {
        "https": _port(config.listen.https),
        "http": _port(config.listen.http),
        "metrics": _port(config.metrics.listen),
    }
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    for probe in probes.values():
        # probes speak plain HTTP: only metrics.listen takes them (the others want PROXY)
        assert probe["port"] == "metrics" and probe["path"] in OPS_PATHS
    # /readyz: bound, a backend healthy, the store answering or (PostgreSQL) only degraded
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert deployment["spec"]["replicas"] == 3
    # the pod is killed only after the pre-stop pause and the edge's own drain
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
        int(pre_stop[1]) + config.shutdown_timeout
    )
    # the config file is where the image looks for it
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_mount = mounts[_image_env()["LINKEDGE_CONFIG"]]
    assert config_mount["subPath"] in manifests["ConfigMap"]["data"]
    assert "/tmp" in mounts  # a read-only root file system needs a writable /tmp
    # ... and a writable place for the local copy that carries clicks through an outage
    assert str(Path(config.store.local_copy).parent) in mounts


def test_deployment_runs_unprivileged() -> None:
    deployment = _kube()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    image_user = [a for w, a in final_stage(instructions(CONTAINERFILE.read_text())) if w == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        == (image_user[-1])
    )
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    # ports below 1024 would need a capability or a sysctl
    assert all(p["containerPort"] >= 1024 for p in container["ports"])
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    for constraint in spread:
        assert _selects(constraint["labelSelector"], pod_labels(deployment))


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def test_service_sends_80_and_443_to_the_edge_listeners(tmp_path: Path) -> None:
    config, manifests = _kube_config(tmp_path)
    deployment = manifests["Deployment"]
    container_ports = {p["name"]: p["containerPort"] for p in _container(deployment)["ports"]}
    service = manifests["Service/linkedge"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert _selects(service["spec"]["selector"], pod_labels(deployment))
    mapped = {p["port"]: container_ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert mapped == {443: _port(config.listen.https), 80: _port(config.listen.http)}
    assert config.edge.https_public_port == 443  # redirects name the port recipients reach
    metrics = manifests["Service/linkedge-metrics"]
    assert _selects(metrics["spec"]["selector"], pod_labels(deployment))
    assert [container_ports[p["targetPort"]] for p in metrics["spec"]["ports"]] == [
        _port(config.metrics.listen)
    ]


def test_secret_holds_exactly_the_files_the_config_reads(tmp_path: Path) -> None:
    config, manifests = _kube_config(tmp_path)
    deployment = manifests["Deployment"]
    local = str(tmp_path / "secrets")
    referenced = {
        config.store.key_file,
        config.store.password_file,
        config.admin.token_file,
        *re.findall(r"sslrootcert=([^&]+)", config.store.url),
    }
    assert all(path.startswith(local + "/") for path in referenced), referenced
    secret = manifests["Secret"]
    assert {Path(p).name for p in referenced} == set(secret["stringData"])
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    # owned by root, group fsGroup: the edge's uid reads them through the group bit
    assert volume["secret"]["defaultMode"] & 0o040
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["fsGroup"] == pod_security["runAsGroup"]
    assert not volume["secret"]["defaultMode"] & 0o007  # nobody else


def test_pdb_keeps_two_of_three_edges(tmp_path: Path) -> None:
    manifests = _kube()
    deployment, pdb = manifests["Deployment"], manifests["PodDisruptionBudget"]
    assert _selects(pdb["spec"]["selector"], pod_labels(deployment))
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    replicas = deployment["spec"]["replicas"]
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        allowed = spec["maxUnavailable"]
    else:
        allowed = replicas - spec["minAvailable"]
    assert allowed == 1 and replicas - allowed >= 2


# -- compose --


def _compose() -> dict[str, Any]:
    (compose,) = _yaml(COMPOSE_DIR / "compose.yaml")
    return compose


def _edges(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in compose["services"].items() if svc.get("command") == ["serve"]
    }


def _fleet_state(tmp_path: Path) -> Path:
    """`fleet.py init` for real, as the compose `init` service runs it."""
    state = tmp_path / "fleet-state"
    result = subprocess.run(
        [sys.executable, str(FLEET), "init", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return state


def _compose_config(tmp_path: Path, state: Path) -> Config:
    """An edge's config as it runs in compose, /fleet-state being `state`."""
    text = (COMPOSE_DIR / "linkedge.toml").read_text().replace("/fleet-state", str(state))
    path = tmp_path / "linkedge.toml"
    path.write_text(text)
    config = load_config(path, environ=_image_env())
    require_serving(config)
    return config


def _ip(service: dict[str, Any]) -> str:
    return str(service["networks"]["fleet"]["ipv4_address"])


def test_compose_fleet_is_three_edges_postgres_pebble_dns_and_backend() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "pebble", "backend", "dns"} <= set(services)
    edges = _edges(compose)
    assert sorted(edges) == ["edge1", "edge2", "edge3"]
    image = _image_env()
    for name, edge in edges.items():
        assert edge["build"]["dockerfile"] == "deploy/Containerfile", name
        assert edge["image"] == services["backend"]["image"]  # one image for the fleet
        assert "./linkedge.toml:" + image["LINKEDGE_CONFIG"] + ":ro" in edge["volumes"]
        assert edge["depends_on"]["postgres"]["condition"] == "service_healthy"
        # hosts registered before every edge listens: the first edge up orders, and a CA
        # validating through an edge not yet up fails the order (a minute's backoff)
        assert "register" not in edge["depends_on"], name
        assert services["register"]["depends_on"][name]["condition"] == "service_healthy"
        assert edge["read_only"] is True and "/tmp" in edge["tmpfs"]
    # each edge reachable from the host on its own ports, loopback only
    published = [p for edge in edges.values() for p in edge["ports"]]
    assert len(published) == len(set(published)) == 12
    assert all(p.startswith("127.0.0.1:") for p in published)


def test_compose_edges_share_the_postgres_service(tmp_path: Path) -> None:
    compose = _compose()
    state = _fleet_state(tmp_path)
    config = _compose_config(tmp_path, state)
    url = urlsplit(config.store.url)
    postgres = compose["services"]["postgres"]
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert url.username == postgres["environment"]["POSTGRES_USER"]
    assert url.path.lstrip("/") == postgres["environment"]["POSTGRES_DB"]
    assert url.password is None  # from the file both sides read
    assert parse_qs(url.query)["sslmode"]
    # the password file the edges read is the one postgres set the role's password from
    password_file = config.store.password_file.replace(str(state), "/fleet-state")
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == password_file
    assert "fleet-state:/fleet-state:ro" in postgres["volumes"]
    for name, edge in _edges(compose).items():
        assert "fleet-state:/fleet-state:ro" in edge["volumes"], name
        assert not any(k.startswith("LINKEDGE_STORE") for k in edge.get("environment", {}))
    # the local copy (database outages) is on a writable volume: the image's VOLUME
    volumes = [a for w, a in final_stage(instructions(CONTAINERFILE.read_text())) if w == "VOLUME"]
    assert any(str(Path(config.store.local_copy).parent) in v for v in volumes)
    # one store key for the fleet, made once
    assert len(load_key(config.store.key_file, None)) == 32


def test_compose_addresses_agree(tmp_path: Path) -> None:
    compose = _compose()
    services = compose["services"]
    config = _compose_config(tmp_path, _fleet_state(tmp_path))
    edge_ips = [_ip(edge) for edge in _edges(compose).values()]
    # the DNS answers edge.cname_target with every edge; the https check dials the same
    assert services["dns"]["environment"]["FLEET_EDGE_ADDRESSES"].split(",") == edge_ips
    assert config.checks.https_addresses == edge_ips
    assert config.edge.cname_target == "edge.fleet.test"
    dns_address = f"{_ip(services['dns'])}:53"
    assert config.dns.nameservers == [dns_address]
    pebble_cmd = services["pebble"]["command"]
    assert pebble_cmd[pebble_cmd.index("-dnsserver") + 1] == dns_address
    subnet = ipaddress.ip_network(compose["networks"]["fleet"]["ipam"]["config"][0]["subnet"])
    assert all(ipaddress.ip_address(ip) in subnet for ip in [*edge_ips, _ip(services["dns"])])
    # the hosts registered are the hosts the DNS points at the edges
    assert (
        services["register"]["environment"]["FLEET_HOSTS"]
        == (services["dns"]["environment"]["FLEET_HOSTS"])
    )
    # Pebble validates on the ports the edges listen on, and serves where acme.directory says
    pebble = json.loads((COMPOSE_DIR / "pebble-config.json").read_text())["pebble"]
    assert pebble["httpPort"] == _port(config.listen.http)
    assert pebble["tlsPort"] == _port(config.listen.https)
    directory = urlsplit_port(config.acme.directory)
    assert directory == ("pebble", _port(pebble["listenAddress"]))
    management = services["pebble-root"]["environment"]["FLEET_PEBBLE_MANAGEMENT"]
    assert urlsplit_port(management) == ("pebble", _port(pebble["managementListenAddress"]))
    assert config.backend.url == "http://backend:8080"


def urlsplit_port(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def test_fleet_init_makes_the_secrets_once(tmp_path: Path) -> None:
    state = _fleet_state(tmp_path)
    files = {p.relative_to(state).as_posix(): p for p in state.rglob("*") if p.is_file()}
    assert set(files) == {
        "secrets/store.key",
        "secrets/admin.token",
        "secrets/db-password",
        "pebble/ca.pem",
        "pebble/cert.pem",
        "pebble/key.pem",
    }
    assert files["secrets/store.key"].stat().st_mode & 0o077 == 0
    assert files["pebble/key.pem"].stat().st_mode & 0o077 == 0
    before = {name: path.read_bytes() for name, path in files.items()}
    _fleet_state(tmp_path)  # `docker compose up` again: nothing is replaced
    assert {name: path.read_bytes() for name, path in files.items()} == before
    # Pebble's config names the identity init writes
    pebble = json.loads((COMPOSE_DIR / "pebble-config.json").read_text())["pebble"]
    for key in ("certificate", "privateKey"):
        assert pebble[key].replace("/fleet-state/", "") in files


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_fleet(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(FLEET), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    return out


def test_fleet_dns_points_every_customer_host_at_the_three_edges() -> None:
    compose = _compose()
    env = compose["services"]["dns"]["environment"]
    port = _free_port()
    proc = _run_fleet(
        ["dns"],
        {**env, "FLEET_DNS_LISTEN": "127.0.0.1", "FLEET_DNS_PORT": str(port)},
    )
    try:
        assert "fleet: DNS on" in (proc.stdout.readline() if proc.stdout else "")
        for host in env["FLEET_HOSTS"].split(","):
            query = dns.message.make_query(host, dns.rdatatype.A)
            answer = dns.query.udp(query, "127.0.0.1", port=port, timeout=5)
            cnames = [r for r in answer.answer if r.rdtype == dns.rdatatype.CNAME]
            addresses = [r for r in answer.answer if r.rdtype == dns.rdatatype.A]
            assert [str(r[0].target) for r in cnames] == ["edge.fleet.test."], host
            assert sorted(str(a) for a in addresses[0]) == sorted(
                env["FLEET_EDGE_ADDRESSES"].split(",")
            )
    finally:
        _stop(proc)


def test_fleet_pebble_starts_on_its_compose_config(tmp_path: Path) -> None:
    """Debian's Pebble takes pebble-config.json and init's identity; pebble-root fetches
    the issuing root the edges' https check trusts."""
    pebble_bin = shutil.which("pebble")
    if pebble_bin is None:
        pytest.skip("pebble not installed (Debian package pebble; deploy/bootstrap.sh --test)")
    state = _fleet_state(tmp_path)
    listen, management = _free_port(), _free_port()
    settings = json.loads((COMPOSE_DIR / "pebble-config.json").read_text())
    pebble = settings["pebble"]
    pebble["listenAddress"] = f"127.0.0.1:{listen}"  # loopback instead of the fleet network
    pebble["managementListenAddress"] = f"127.0.0.1:{management}"
    for key in ("certificate", "privateKey"):
        pebble[key] = pebble[key].replace("/fleet-state", str(state))
    config_path = tmp_path / "pebble-config.json"
    config_path.write_text(json.dumps(settings))
    compose = _compose()
    command = list(compose["services"]["pebble"]["command"])
    command[command.index("-config") + 1] = str(config_path)
    command[command.index("-dnsserver") + 1] = f"127.0.0.1:{_free_port()}"
    log = (tmp_path / "pebble.log").open("w")
    proc = subprocess.Popen(
        [pebble_bin, *command],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **compose["services"]["pebble"]["environment"]},
    )
    try:
        fetch = _run_fleet(
            ["pebble-root", str(state)],
            {
                "FLEET_PEBBLE_MANAGEMENT": f"https://localhost:{management}",
                "FLEET_PEBBLE_TIMEOUT": "30",
            },
        )
        out, _ = fetch.communicate(timeout=60)
        assert fetch.returncode == 0, out + (tmp_path / "pebble.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    root = (state / "pebble" / "root.pem").read_text()
    assert root.startswith("-----BEGIN CERTIFICATE-----")


def _fleet_module() -> Any:
    spec = importlib.util.spec_from_file_location("fleet", FLEET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fleet_register_adds_each_host_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`register` runs on every `compose up`: a second run must not fail on known hosts.
    (In this process: the CLI's imports are what a subprocess per run would cost.)"""
    key = tmp_path / "store.key"
    key.write_text(generate_key_text())
    config = tmp_path / "linkedge.toml"
    config.write_text(
        f'[backend]\nurl = "http://127.0.0.1:1"\n[edge]\ncname_target = "edge.fleet.test"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/fleet.db"\nkey_file = "{key}"\n'
    )
    hosts = _compose()["services"]["register"]["environment"]["FLEET_HOSTS"]
    monkeypatch.setenv("FLEET_HOSTS", hosts)
    monkeypatch.setenv("LINKEDGE_CONFIG", str(config))
    fleet = _fleet_module()
    umask = os.umask(0o022)  # the CLI sets 0077 for what it writes; keep the test's own
    try:
        fleet.register()
        fleet.register()
        capsys.readouterr()
        assert cli_main(["domains", "list", "--json"]) == 0
    finally:
        os.umask(umask)
    listed = json.loads(capsys.readouterr().out)
    assert sorted(row["hostname"] for row in listed) == sorted(hosts.split(","))


def test_docker_compose_accepts_the_fleet() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30
        ).returncode
    ):
        pytest.skip("no `docker compose` (the compose plugin) to validate compose.yaml with")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_DIR / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- the compose fleet, run on loopback --------------------------------------------
# No container runtime here (nor in CI), so the fleet's parts run as processes: the
# compose network 172.29.11.0/24 becomes loopback 127.29.11.0/24 (same last octets), and
# what only differs because of that (the listeners' ports, the service names) is given in
# LINKEDGE_* variables, the way the image's environment overrides the file in compose.
# Everything else is compose.yaml's, linkedge.toml's, pebble-config.json's and fleet.py's.

FLEET_SUBNET, LOOPBACK_SUBNET = "172.29.11.", "127.29.11."


def _loopback(address: str) -> str:
    return address.replace(FLEET_SUBNET, LOOPBACK_SUBNET)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKEDGE_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


async def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"edge exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    pytest.fail(f"{url} not ready within 60 s:\n{log.read_text()[-3000:]}")


async def test_compose_fleet_serves_every_host_on_every_edge_with_one_order_each(
    tmp_path: Path, postgres: Any
) -> None:
    from proxy.demo.client import click, edge_session

    pebble_bin = shutil.which("pebble")
    if pebble_bin is None:
        pytest.skip("pebble not installed (Debian package pebble; deploy/bootstrap.sh --test)")
    compose = _compose()
    services = compose["services"]
    edges = {name: _loopback(_ip(svc)) for name, svc in _edges(compose).items()}
    state = _fleet_state(tmp_path)
    # the fixture's server stands in for the postgres service: same role, its password in
    # the file both sides read (in compose, postgres sets the role's password from it)
    password_file = state / "secrets" / "db-password"
    password_file.unlink()
    password_file.write_text(postgres.password)
    database = postgres.create_database()
    config_path = tmp_path / "linkedge.toml"
    config_path.write_text(
        (COMPOSE_DIR / "linkedge.toml").read_text().replace("/fleet-state", str(state))
    )
    compose_config = load_config(config_path, environ={})
    store_url = urlsplit(compose_config.store.url)
    assert store_url.username == "linkedge"  # the fixture's role is the compose one
    https_port, http_port = _free_port(), _free_port()  # one pair, on each edge's address
    dns_port, pebble_port, management_port = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        return proc

    try:
        dns_env = services["dns"]["environment"]
        dns_address = f"{_loopback(_ip(services['dns']))}:{dns_port}"
        start(
            "dns",
            [sys.executable, str(FLEET), "dns"],
            _child_env(
                {
                    "FLEET_HOSTS": dns_env["FLEET_HOSTS"],
                    "FLEET_EDGE_ADDRESSES": _loopback(dns_env["FLEET_EDGE_ADDRESSES"]),
                    "FLEET_DNS_LISTEN": dns_address.rsplit(":", 1)[0],
                    "FLEET_DNS_PORT": str(dns_port),
                }
            ),
        )
        settings = json.loads((COMPOSE_DIR / "pebble-config.json").read_text())
        pebble = settings["pebble"]
        pebble["listenAddress"] = f"127.0.0.1:{pebble_port}"
        pebble["managementListenAddress"] = f"127.0.0.1:{management_port}"
        pebble["httpPort"], pebble["tlsPort"] = http_port, https_port  # the edges' 80 and 443
        for key in ("certificate", "privateKey"):
            pebble[key] = pebble[key].replace("/fleet-state", str(state))
        (tmp_path / "pebble-config.json").write_text(json.dumps(settings))
        command = list(services["pebble"]["command"])
        command[command.index("-config") + 1] = str(tmp_path / "pebble-config.json")
        command[command.index("-dnsserver") + 1] = dns_address
        start(
            "pebble",
            [pebble_bin, *command],
            {**os.environ, **services["pebble"]["environment"]},
        )
        backend_port = _free_port()
        start(
            "backend",
            [sys.executable, str(FLEET), "backend"],
            _child_env(
                {"FLEET_BACKEND_LISTEN": "127.0.0.1", "FLEET_BACKEND_PORT": str(backend_port)}
            ),
        )
        # what every edge and `register` get instead of the compose network's names
        overrides = {
            "LINKEDGE_CONFIG": str(config_path),
            "LINKEDGE_STORE_URL": store_url._replace(
                netloc=f"linkedge@127.0.0.1:{postgres.port}", path=f"/{database}"
            ).geturl(),
            "LINKEDGE_BACKEND_URL": f"http://127.0.0.1:{backend_port}",
            "LINKEDGE_ACME_DIRECTORY": f"https://localhost:{pebble_port}/dir",
            "LINKEDGE_DNS_NAMESERVERS": dns_address,
            "LINKEDGE_CHECKS_HTTPS_ADDRESSES": ",".join(edges.values()),
            "LINKEDGE_CHECKS_HTTPS_PORT": str(https_port),
            "LINKEDGE_WORKERS": "1",  # 3 nodes on a 2-core machine; workers are not the point
        }
        # the one-shot service the edges wait for
        pebble_root = start(
            "pebble-root",
            [sys.executable, str(FLEET), "pebble-root", str(state)],
            _child_env({"FLEET_PEBBLE_MANAGEMENT": f"https://localhost:{management_port}"}),
        )
        assert pebble_root.wait(120) == 0, (logs / "pebble-root.log").read_text()
        ready = []
        for name, ip in edges.items():
            metrics_port = _free_port()
            proc = start(
                name,
                [sys.executable, "-m", "proxy.app.cli", "serve"],
                _child_env(
                    {
                        **overrides,
                        "LINKEDGE_LISTEN_HTTPS": f"{ip}:{https_port}",
                        "LINKEDGE_LISTEN_HTTP": f"{ip}:{http_port}",
                        "LINKEDGE_ADMIN_LISTEN": f"{ip}:{_free_port()}",
                        "LINKEDGE_METRICS_LISTEN": f"{ip}:{metrics_port}",
                        # each container has its own /var/lib/linkedge; processes on one
                        # machine would share the default local copy (and other tests')
                        "LINKEDGE_STORE_LOCAL_COPY": str(tmp_path / f"{name}.local-copy.db"),
                    }
                ),
            )
            ready.append(
                _wait_ready(proc, f"http://{ip}:{metrics_port}/readyz", logs / f"{name}.log")
            )
        await asyncio.gather(*ready)  # /readyz: listeners bound, store read, backend healthy
        # the hosts are registered once every edge is up, as compose orders it
        register = start(
            "register",
            [sys.executable, str(FLEET), "register"],
            _child_env(
                {**overrides, "FLEET_HOSTS": services["register"]["environment"]["FLEET_HOSTS"]}
            ),
        )
        assert register.wait(120) == 0, (logs / "register.log").read_text()

        hosts = services["register"]["environment"]["FLEET_HOSTS"].split(",")
        root = str(state / "pebble" / "root.pem")
        # Each edge serves each host, whichever of them ordered its certificate (a click, or
        # the background checks once the CNAME is seen) and whichever one Pebble validated
        # through (the DNS gives it all three). Clicks go over a context that trusts
        # Pebble's root only and checks the name.
        for host in hosts:
            for name, ip in edges.items():
                async with edge_session(ip, root) as session:
                    result = await click(session, f"https://{host}:{https_port}/c/{name}")
                assert result.status == 302, (host, name, result)
        # one order per host, fleet-wide
        ordered = [
            line.split("order created for ", 1)[1].split(":", 1)[0]
            for name in edges
            for line in (logs / f"{name}.log").read_text().splitlines()
            if "order created for " in line
        ]
        assert sorted(ordered) == sorted(hosts), ordered
        assert (logs / "pebble.log").read_text().count("Added order") == len(hosts)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
