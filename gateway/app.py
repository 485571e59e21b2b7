"""The composition root: a validated config becomes the Serve deployment graph.

``serve run gateway.app:app_builder config=configs/default.yaml``, ``serve
deploy`` of a Serve config and ``llm-gateway serve`` all come through here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from gateway.config import (
    ConfigError,
    GatewayConfig,
    ModelConfig,
    load_config,
    parse_config,
)
from gateway.deploy import INGRESS_NAME
from gateway.http.ingress import GatewayIngress
from models.llm.server import LLMServer


def _deployment(cls: type) -> Deployment:
    # serve.deployment's overloads type a bare class as a decorator factory.
    return cast(Deployment, serve.deployment(cls))


def deployment_name(model: ModelConfig) -> str:
    """The Serve deployment serving ``model`` (Serve forbids '#' in names)."""
    return "LLMServer:" + re.sub(r"[^A-Za-z0-9._:/-]", "_", model.name)


def build_app(config: GatewayConfig) -> Application:
    """The ingress bound to one LLM deployment per configured model.

    Routing travels as the ingress's ``user_config`` and stays out of its init
    arguments: changing weights or routes and redeploying reconfigures the
    ingress in place, and deployments whose arguments did not change keep
    running.
    """
    handles = {}
    for model in config.models:
        deployment = _deployment(LLMServer).options(
            name=deployment_name(model),
            num_replicas=model.num_replicas,
            max_ongoing_requests=model.max_ongoing_requests,
            max_queued_requests=model.max_queued_requests,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
            health_check_period_s=10,
            health_check_timeout_s=30,
            # The ingress logs each request once; a second line per model
            # call costs CPU on the hot path and says nothing new.
            logging_config={"enable_access_log": False},
        )
        handles[model.name] = deployment.bind(model)
    static = config.without_routing()
    ingress = _deployment(GatewayIngress).options(
        name=INGRESS_NAME,
        user_config={"routing": config.routing.model_dump(mode="json")},
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    )
    return ingress.bind(static, handles)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder.

    ``args``: ``config``, a YAML path or a config mapping; optional
    ``base_dir``, the directory relative model paths start from (default: the
    working directory). Other keys (such as the digest ``gateway.deploy`` adds
    to mark a changed config) are ignored.
    """
    source = args.get("config")
    if source is None:
        raise ConfigError("app_builder needs `config`: a YAML path or a config mapping")
    base_dir = Path(args["base_dir"]) if "base_dir" in args else None
    if isinstance(source, dict):
        return build_app(parse_config(source, base_dir=base_dir))
    return build_app(load_config(source, base_dir=base_dir))
