"""The container files: docker-compose.yml, Dockerfile(s) and the Prometheus config.

No Docker engine runs here, so the tests check what can be checked: the files
parse, their names and ports agree with the CLI, and every command they run
is a real ``normserve`` invocation, run here as a subprocess with the
environment the container would give it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from serverproc import NORMSERVE, ServerProcess, env_variables, patience
from test_observability import free_port, scrape

import normkernels as nk
from normkernels import compiled
from normserve.client import NormClient

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
ALERTS = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())


def dockerfile(name: str) -> dict[str, list[str]]:
    """Instruction -> the argument strings of each of its lines (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


def image_environment(instructions: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for line in instructions.get("ENV", []):
        env.update(item.split("=", 1) for item in shlex.split(line))
    return env


def exec_form(text: str) -> list[str]:
    """A JSON exec form (["normserve", "serve"]); the shell form would lose signals and is refused."""
    argv = json.loads(text)
    assert isinstance(argv, list), f"{text} is not in exec form"
    return argv


IMAGES = {"normserve": dockerfile("Dockerfile"), "normserve-gpu": dockerfile("Dockerfile.gpu")}


def container(service: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment the service's container runs, with free ports and a writable state dir."""
    image = IMAGES[service]
    spec = SERVICES[service]
    (entrypoint,) = image["ENTRYPOINT"]
    argv = exec_form(entrypoint) + spec["command"]
    env = image_environment(image) | {k: str(v) for k, v in spec["environment"].items()}
    # The image puts its venv first on PATH; here the test's venv plays that part.
    env["PATH"] = os.pathsep.join([str(Path(NORMSERVE).parent), os.environ.get("PATH", "")])
    env |= {
        "NORMSERVE_PORT": str(free_port()),
        "NORMSERVE_METRICS_PORT": str(free_port()),
        "NORMSERVE_STATE_DIR": str(tmp_path / "state"),
        # The image's kernel cache holds kernels compiled at build time; here the test session's does.
        "NORMKERNELS_CACHE_DIR": str(compiled.cache_dir()),
    }
    return argv, env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=patience(6), env={**os.environ, **env})


# ---------------------------------------------------------------------- the files agree with each other and the CLI
def test_compose_declares_the_services_profiles_and_volumes() -> None:
    normserve, gpu, prometheus = SERVICES["normserve"], SERVICES["normserve-gpu"], SERVICES["prometheus"]
    assert "profiles" not in normserve  # `docker compose up` starts it
    assert gpu["profiles"] == ["gpu"]
    assert prometheus["profiles"] == ["monitoring"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert gpu["command"][-2:] == ["--device", "cuda"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    for name in ("normserve", "normserve-gpu"):
        spec = SERVICES[name]
        assert spec["restart"] == "unless-stopped"
        assert spec["healthcheck"]["test"][0] == "CMD"
        grace = float(spec["environment"]["NORMSERVE_GRACE_PERIOD"])
        assert float(spec["stop_grace_period"].removesuffix("s")) > grace  # in-flight calls finish before SIGKILL
        (volume,) = spec["volumes"]
        named, mount = volume.split(":")
        assert named in COMPOSE["volumes"]
        assert mount == spec["environment"]["NORMSERVE_STATE_DIR"]
        assert mount in exec_form(IMAGES[name]["VOLUME"][0])
    assert prometheus["depends_on"]["normserve"]["condition"] == "service_healthy"


def test_every_environment_name_is_a_flag() -> None:
    serve = env_variables("serve")
    assert len(serve) > 20
    named = set(re.findall(r"NORMSERVE_[A-Z_]+", (ROOT / "docker-compose.yml").read_text()))  # comments too
    for image in IMAGES.values():
        named |= {k for k in image_environment(image) if k.startswith("NORMSERVE_")}
    assert named
    assert named <= serve, named - serve


def test_ports_agree_across_compose_images_and_prometheus() -> None:
    for name, image in IMAGES.items():
        env = SERVICES[name]["environment"]
        ports = {int(env["NORMSERVE_PORT"]), int(env["NORMSERVE_METRICS_PORT"])}
        assert {int(p.split(":")[1]) for p in SERVICES[name]["ports"]} == ports
        assert {int(p) for p in image["EXPOSE"][0].split()} == ports
        assert image_environment(image)["NORMSERVE_PORT"] == env["NORMSERVE_PORT"]
        assert image_environment(image)["NORMSERVE_HOST"] == "0.0.0.0"  # reachable from outside the container
        assert "USER" in image
        assert image["USER"] == ["normserve"]  # not root
    (job,) = PROMETHEUS["scrape_configs"]
    (static,) = job["static_configs"]
    metrics_port = SERVICES["normserve"]["environment"]["NORMSERVE_METRICS_PORT"]
    assert static["targets"] == [f"normserve:{metrics_port}"]
    mounts = {v.split(":")[1] for v in SERVICES["prometheus"]["volumes"] if v.startswith("./")}
    assert set(PROMETHEUS["rule_files"]) <= mounts
    assert "/etc/prometheus/prometheus.yml" in mounts
    for volume in SERVICES["prometheus"]["volumes"]:
        if volume.startswith("./"):
            assert (ROOT / volume.split(":")[0]).is_file()


# ---------------------------------------------------------------------- what the containers run, run here
def test_the_compose_service_serves_and_passes_its_healthchecks(tmp_path) -> None:
    argv, env = container("normserve", tmp_path)
    proc = ServerProcess(tmp_path / "state", env=env, command=argv).start()
    try:
        assert f":{env['NORMSERVE_PORT']} " in proc.log()  # the port comes from the environment
        assert all(line.startswith("{") for line in proc.log().splitlines())  # NORMSERVE_LOG_FORMAT=json
        healthcheck = SERVICES["normserve"]["healthcheck"]["test"][1:]
        result = _run(healthcheck, env)
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout
        (image_check,) = IMAGES["normserve"]["HEALTHCHECK"]
        assert _run(exec_form(image_check.split(" CMD ", 1)[1]), env).returncode == 0

        # Metrics on NORMSERVE_METRICS_PORT carry every series the alert rules use.
        with NormClient(proc.target) as nc:
            layer = nc.create_layer("deployed", "batch_norm", num_features=4)
            layer.train(np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
        families = {name for name, _ in scrape(int(env["NORMSERVE_METRICS_PORT"]))}
        for rule in ALERTS["groups"][0]["rules"]:
            used = set(re.findall(r"\bnormserve_[a-z_]+", rule["expr"]))
            assert used <= families, (rule["alert"], used - families)
    finally:
        proc.process.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        assert proc.process.wait(patience(6)) == 0
    assert any((tmp_path / "state").iterdir())  # the state went where NORMSERVE_STATE_DIR said


def test_the_gpu_service_command(tmp_path) -> None:
    argv, env = container("normserve-gpu", tmp_path)
    if nk.cuda_device_count() == 0:
        result = _run(argv, env)
        assert result.returncode == 1  # a clear refusal, not a CPU server in a GPU's place
        assert "CuPy" in result.stderr or "CUDA" in result.stderr
        return
    proc = ServerProcess(tmp_path / "state", env=env, command=argv).start()
    try:
        assert "device cuda:0" in proc.log()
        assert _run(SERVICES["normserve-gpu"]["healthcheck"]["test"][1:], env).returncode == 0
    finally:
        assert proc.stop() == 0


PACKAGE_FILES = {"normkernels", "server", "client", "tools", "protos", "pyproject.toml", "README.md"}


@pytest.mark.parametrize("service", sorted(IMAGES))
def test_images_install_the_package_from_what_they_copy(service) -> None:
    image = IMAGES[service]
    sources = {word for line in image["COPY"] if not line.startswith("--from") for word in line.split()[:-1]}
    assert sources == PACKAGE_FILES
    kept = {line.removeprefix("!").rstrip("/") for line in (ROOT / ".dockerignore").read_text().split()}
    assert kept >= PACKAGE_FILES  # the build context holds them
    assert any("pip install" in line for line in image["RUN"])


# ---------------------------------------------------------------------- the cluster profile
def test_the_cluster_profile_runs_three_replicas_behind_nginx_on_the_generated_config() -> None:
    from normserve.server.cluster_views import parse_peers

    single, nginx = SERVICES["normserve"], SERVICES["nginx"]
    replicas = {name: spec for name, spec in SERVICES.items() if re.fullmatch(r"normserve-\d+", name)}
    addresses = [f"{name}:{spec['environment']['NORMSERVE_PORT']}" for name, spec in sorted(replicas.items())]
    assert len(addresses) == 3
    assert nginx["profiles"] == ["cluster"]
    volumes = set()
    for address, (name, spec) in zip(addresses, sorted(replicas.items()), strict=True):
        assert spec["profiles"] == ["cluster"]  # `docker compose up` alone starts the single service only
        for key in ("image", "command", "healthcheck", "restart", "stop_grace_period"):
            assert spec[key] == single[key], (name, key)  # the single service's checks and graceful stop
        assert spec["environment"] == single["environment"] | {
            "NORMSERVE_PEERS": spec["environment"]["NORMSERVE_PEERS"]
        }
        assert parse_peers(spec["environment"]["NORMSERVE_PEERS"]) == tuple(a for a in addresses if a != address)
        (volume,) = spec["volumes"]
        named, mount = volume.split(":")
        assert named in COMPOSE["volumes"]
        assert mount == spec["environment"]["NORMSERVE_STATE_DIR"]
        volumes.add(named)
    assert len(volumes) == 3  # a state dir belongs to one server
    assert "normserve-state" not in volumes
    assert nginx["depends_on"] == {name: {"condition": "service_healthy"} for name in replicas}
    (config,) = nginx["volumes"]
    source, target, mode = config.split(":")
    assert (target, mode) == ("/etc/nginx/conf.d/default.conf", "ro")
    (port,) = nginx["ports"]
    published, listen = port.split(":")
    assert published not in {p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", []) if s is not nginx}
    generated = subprocess.run(
        [NORMSERVE, "nginx-config", "--replicas", ",".join(addresses), "--listen", listen],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (ROOT / source).read_text() == generated, "regenerate deploy/nginx/normserve.conf (see docker-compose.yml)"
    assert float(nginx["stop_grace_period"].removesuffix("s")) >= float(single["stop_grace_period"].removesuffix("s"))
