"""Issue 13: the deployment files are valid (Prometheus rules, Grafana dashboard,
container image, systemd unit), checked with the real tools where they exist."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

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
