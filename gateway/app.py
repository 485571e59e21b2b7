"""The composition root: a validated config becomes Serve applications.

- ``llm-gateway serve`` / ``llm-gateway deploy`` (``gateway.deploy``) run one
  application per model (``model_app_builder``) and one for the ingress
  (``ingress_app_builder``), so models can come and go without restarting the
  others.
- ``serve run gateway.app:app_builder config=configs/default.yaml`` (and a
  KubeRay ``serveConfigV2`` naming ``app_builder``) run the whole gateway as a
  single application: simpler, but adding or removing a model rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from gateway.config import (
    ConfigError,
    FrontDoorConfig,
    GatewayConfig,
    ModelConfig,
    VLLMModelConfig,
    load_config,
    parse_config,
    parse_model,
)
from gateway.deploy import INGRESS_NAME, deployment_name, ingress_user_config
from gateway.http.ingress import DRAIN_CHECK_S, GatewayIngress
from gateway.metrics.hub import HUB_NAME, MetricsHub
from gateway.placement import deployment_options
from models.classical.server import ClassicalServer
from models.llm.server import LLMServer


def _deployment(cls: type) -> Deployment:
    # serve.deployment's overloads type a bare class as a decorator factory.
    return cast(Deployment, serve.deployment(cls))


def model_deployment(model: ModelConfig, gateway_app: str | None = None) -> Application:
    """The deployment serving ``model``, bound to its config.

    ``gateway_app`` names the application holding the ingress, where an LLM
    replica's engine metrics go (None: the model's own application, as in the
    single-application form).
    """
    deployment = _deployment(LLMServer if model.kind == "llm" else ClassicalServer).options(
        name=deployment_name(model),
        **deployment_options(model),
        # An LLM replica whose engine died exits (``models.llm.server``);
        # Serve notices on its next health check, so they come often.
        health_check_period_s=2 if model.kind == "llm" else 10,
        health_check_timeout_s=30,
        # The ingress logs each request once; a second line per model
        # call costs CPU on the hot path and says nothing new.
        logging_config={"enable_access_log": False},
    )
    if isinstance(model, VLLMModelConfig):
        # Its adapters reach the replicas live, as their ``user_config``.
        return deployment.bind(parse_model(model.deployment_args()), gateway_app=gateway_app)
    if model.kind == "llm":
        return deployment.bind(model, gateway_app=gateway_app)
    return deployment.bind(model)


HUB_CALLS = 10_000


def _hub(front_door: FrontDoorConfig) -> Application | None:
    """The metrics hub the ingress replicas share (with the keys' ledger); None
    for one ingress replica, which keeps both itself: one Ray worker fewer
    awake beside the engines (``gateway.metrics.hub``)."""
    if front_door.ingress.num_replicas == 1:
        return None
    # One small replica: it only sums snapshots and writes the page. Each LLM
    # replica holds a call open there through an ingress replica
    # (gateway.metrics.engine_pages), beside the ingress replicas' reports and
    # scrapes: Serve's default of 5 calls at once would queue them behind each other.
    hub = _deployment(MetricsHub).options(
        name=HUB_NAME,
        num_replicas=1,
        max_ongoing_requests=HUB_CALLS,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False},
        # Limited keys are answered 503 until a hub that died is replaced,
        # and Serve notices only on a health check: they come often.
        health_check_period_s=2,
    )
    return hub.bind()


INGRESS_ENV = {"RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0"}


def _ingress(front_door: FrontDoorConfig, **options: Any) -> Deployment:
    return _deployment(GatewayIngress).options(
        name=INGRESS_NAME,
        num_replicas=front_door.ingress.num_replicas,
        max_ongoing_requests=front_door.ingress.max_ongoing_requests,
        # A stopping ingress replica takes no new requests and lets its own
        # (streams included) finish for this long.
        graceful_shutdown_timeout_s=front_door.ingress.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
        # The relay learns a model's replicas by sampling Serve's router, which
        # offers only those in the ingress's own availability zone where any
        # are: replicas in other zones would never get its traffic.
        ray_actor_options={"num_cpus": front_door.ingress.num_cpus, "runtime_env": {"env_vars": INGRESS_ENV}},
        # The gateway writes its own access log (``gateway.http.access_log``);
        # Serve's would be a second line per request, written on the hot path.
        logging_config={"enable_access_log": False},
        **options,
    )


def build_app(config: GatewayConfig) -> Application:
    """The whole gateway as one application: the ingress bound to every model.

    Nodes are not checked here: Serve builds it as it starts (KubeRay's
    RayService, ``serve run``), often before the nodes that will hold the
    replicas have joined; Serve then waits for them. ``llm-gateway serve`` and
    ``deploy`` check the live nodes first (``gateway.deploy.deploy``).
    """
    handles = {model.name: model_deployment(model) for model in config.models}
    front_door = config.front_door()
    ingress = _ingress(front_door, user_config=ingress_user_config(config))
    return ingress.bind(front_door, handles, _hub(front_door))


def model_app_builder(args: dict[str, Any]) -> Application:
    """One model's application; ``args["model"]`` is its config (``gateway.deploy``)."""
    model = parse_model(args["model"])
    return model_deployment(model, gateway_app=args.get("gateway"))


def ingress_app_builder(args: dict[str, Any]) -> Application:
    """The ingress alone; it finds each model's application by name.

    ``args["gateway"]`` holds the front door's settings; the models and routes
    arrive as the ingress's ``user_config`` (``gateway.deploy``).
    """
    front_door = FrontDoorConfig.model_validate(args["gateway"])
    return _ingress(front_door).bind(front_door, None, _hub(front_door))


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder for the single-application form.

    ``args``: ``config``, a YAML path or a config mapping; optional
    ``base_dir``, the directory relative model paths start from (default: the
    working directory).
    """
    source = args.get("config")
    if source is None:
        raise ConfigError("app_builder needs `config`: a YAML path or a config mapping")
    base_dir = Path(args["base_dir"]) if "base_dir" in args else None
    if isinstance(source, dict):
        return build_app(parse_config(source, base_dir=base_dir))
    return build_app(load_config(source, base_dir=base_dir))
