"""gateway/app.py: the Serve deployments the gateway is made of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray

from gateway.app import app_builder, ingress_app_builder, model_deployment
from gateway.config import FrontDoorConfig, parse_config


def test_serve_writes_no_access_log_line_of_its_own(tmp_path: Path) -> None:
    # The gateway logs each request once (``gateway.http.access_log``); a line
    # of Serve's own per request, or per model call, would be a second,
    # written on the hot path.
    config = parse_config(
        {"models": [{"name": "echo", "engine": "echo"}, {"name": "iris", "engine": "sklearn", "model": str(tmp_path)}]}
    )
    apps = [
        ingress_app_builder({"gateway": config.front_door().model_dump(mode="json")}),
        *(model_deployment(model) for model in config.models),
    ]
    for app in apps:
        assert app._bound_deployment.logging_config["enable_access_log"] is False


def test_a_lone_ingress_replica_keeps_the_metrics_hub_itself_and_several_share_one() -> None:
    # One Ray worker fewer awake beside the engines in the default
    # deployment; several ingress replicas need the one hub (and its ledger).
    def hub_of(replicas: int) -> Any:
        front_door = FrontDoorConfig.model_validate({"ingress": {"num_replicas": replicas}})
        return ingress_app_builder({"gateway": front_door.model_dump(mode="json")})._bound_deployment.init_args[2]

    assert hub_of(1) is None
    hub = hub_of(2)._bound_deployment
    assert (hub.name, hub.num_replicas) == ("MetricsHub", 1)


def test_the_single_application_is_built_without_asking_for_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # `serve run gateway.app:app_builder config=...` calls the builder before it
    # starts or joins a cluster, and KubeRay builds it before its workers join:
    # Serve waits for the nodes (`llm-gateway serve` and `deploy` check them first).
    def no_cluster() -> None:
        raise RuntimeError("Ray has not been started yet")

    monkeypatch.setattr(ray, "nodes", no_cluster)
    app = app_builder({"config": {"models": [{"name": "echo", "engine": "echo"}]}})
    assert app._bound_deployment.name == "GatewayIngress"


def test_the_ingress_learns_replicas_in_every_availability_zone() -> None:
    # Serve's router offers only same-zone replicas where any exist; the relay
    # samples it to learn a model's replicas, and never saw the other zones'.
    front_door = FrontDoorConfig.model_validate({})
    ingress = ingress_app_builder({"gateway": front_door.model_dump(mode="json")})._bound_deployment
    env = ingress.ray_actor_options["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING"] == "0"
    assert ingress.ray_actor_options["num_cpus"] == front_door.ingress.num_cpus


def test_serves_drain_before_an_ingress_replica_stops_fits_within_its_stop_margin() -> None:
    # A model replica's metrics long poll held on the ingress kept Serve's 2 s drain loop going a second
    # time: the stop began 4 s into the grace, and the front door's requests ran past Serve's kill.
    from gateway.http.ingress import DRAIN_CHECK_S, STOP_MARGIN_S
    from gateway.metrics.engine_pages import HOLD_S

    front_door = FrontDoorConfig.model_validate({})
    ingress = ingress_app_builder({"gateway": front_door.model_dump(mode="json")})._bound_deployment
    assert ingress._deployment_config.graceful_shutdown_wait_loop_s == DRAIN_CHECK_S
    assert HOLD_S + DRAIN_CHECK_S < STOP_MARGIN_S
