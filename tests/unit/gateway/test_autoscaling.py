"""gateway/autoscaling.py: Serve's autoscaling of an LLM counts the requests
relayed to its replicas, under Serve's own bounds and delays, in the form
Serve deploys it (pickled by value, the policy named in the config)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import autoscaling
from gateway.config import parse_config
from gateway.placement import autoscaling_config

SCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2, "upscale_delay_s": 0}


def _context(relayed: list[float], routed: float = 0.0, replicas: int = 2, target: int = 2) -> Any:
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(**{**SCALING, "upscale_delay_s": 0, "downscale_delay_s": 0})
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMServer:m", app_name="gw:m", current_num_replicas=replicas,
        target_num_replicas=target, running_replicas=[], total_num_requests=routed, total_queued_requests=0,
        aggregated_metrics={autoscaling.RELAYED: dict(enumerate(relayed))}, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config,
    )


@pytest.mark.parametrize(
    ("relayed", "routed", "replicas"),
    [([3.0, 5.0], 0.0, 4.0), ([1.0, 0.0], 0.0, 0.5), ([2.0, 2.0], 2.0, 3.0), ([], 0.0, 0.0)],
)
def test_replicas_are_the_relayed_and_routed_requests_over_the_target(
    relayed: list[float], routed: float, replicas: float
) -> None:
    assert autoscaling.relayed_load_policy(_context(relayed, routed)) == (replicas, {})


def test_an_llms_autoscaling_config_names_the_policy_and_serve_runs_it_as_deployed() -> None:
    from ray.serve.config import AutoscalingConfig

    llm = parse_config({"models": [{"name": "m", "engine": "echo", "autoscaling": SCALING}]}).models[0]
    scaling = autoscaling_config(llm)
    assert scaling is not None and scaling["policy"] == {"policy_function": autoscaling.POLICY}
    config = AutoscalingConfig(**scaling)
    config.policy.serialize_policy()  # as Serve does on deploy: the function pickled by value
    policy = config.policy.get_policy()
    assert policy(_context([6.0, 4.0])) == (5.0, {})
    embedder = {"name": "e", "engine": "sentence-transformers", "model": "org/e", "autoscaling": SCALING}
    classical = autoscaling_config(parse_config({"models": [embedder]}).models[0])
    assert classical is not None and "policy" not in classical  # Serve routes its requests: its own policy


def test_the_llm_replica_reports_its_relayed_requests() -> None:
    from models.llm.server import LLMServer

    server = LLMServer.__new__(LLMServer)
    server._relay = type("Relay", (), {"ongoing": 7})()  # type: ignore[attr-defined]
    assert server.record_autoscaling_stats() == {autoscaling.RELAYED: 7.0}
