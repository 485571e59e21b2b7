"""Deploys the gateway the way ``serve deploy`` does, one Serve application per model.

Serve restarts an application's replicas when its import path or arguments
change, and otherwise applies only the deployment overrides of the new
config. So the gateway deploys:

- one application per model (``<app>:<model>``), whose arguments are just the
  fields that shape its replicas: adding or removing a model touches no other
  model, and live fields (replica count, batching, a vLLM model's LoRA
  adapters) travel as overrides;
- the ingress application (``<app>``), whose arguments are the front door's
  own settings; the model list, the routing table and the API keys travel as
  its ``user_config``, so changing them reconfigures the running ingress.

``deploy`` applies a new config in three steps so no request fails: new or
changed models first (and adapters new to running replicas), then the
ingress's new table, then the removal of models and adapters no longer listed
(Serve lets their requests in flight finish). When the new
models need resources that only the leaving ones free, it applies everything
in one step instead: Serve drains the old replicas and starts the new ones as
room frees up, and requests for a new model wait for its first replica.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from gateway.config import ConfigError, GatewayConfig, ModelConfig
from gateway.placement import check_fits, check_together, fits_free, live_options

logger = logging.getLogger(__name__)

INGRESS_NAME = "GatewayIngress"
# What a deploy did to a model (``deploy``'s answer).
ADDED = "added"
REPLACED = "replicas replaced (rolling)"
LIVE = "changed live (its replicas kept)"
REMOVED = "removed"
INGRESS_IMPORT_PATH = "gateway.app:ingress_app_builder"
MODEL_IMPORT_PATH = "gateway.app:model_app_builder"


def deployment_name(model: ModelConfig) -> str:
    """The Serve deployment serving ``model`` (Serve forbids '#' in names)."""
    server = "LLMServer" if model.kind == "llm" else "ClassicalServer"
    return f"{server}:" + re.sub(r"[^A-Za-z0-9._:/-]", "_", model.name)


def model_app_name(gateway_app: str, model: str) -> str:
    """The Serve application that holds one model's deployment."""
    return f"{gateway_app}:{model}"


def ingress_user_config(config: GatewayConfig) -> dict[str, Any]:
    """What the ingress reconfigures itself from: every model, the routes and
    the API keys (their hashes)."""
    return {
        "models": [_dumped(model) for model in config.models],
        "routing": config.routing.model_dump(mode="json"),
        "keys": [k.model_dump(mode="json", exclude_none=True) for k in config.keys],
    }


def _dumped(model: ModelConfig) -> dict[str, Any]:
    """``model`` as JSON, read back as the same config: a dump writes every
    default, and ``num_replicas`` beside ``autoscaling`` reads as set (refused)."""
    return model.model_dump(mode="json", exclude={"num_replicas"} if model.autoscaling else None)


def model_deployment_overrides(model: ModelConfig) -> dict[str, Any]:
    """The live fields of a model's deployment, applied without a restart."""
    return {"name": deployment_name(model), **live_options(model)}


def serve_config(config: GatewayConfig) -> dict[str, Any]:
    """The Serve deploy config (``serve deploy`` format) for ``config``.

    Model paths must already be absolute (``parse_config`` resolves them).
    """
    apps: list[dict[str, Any]] = [
        {
            "name": model_app_name(config.app_name, model.name),
            "route_prefix": None,
            "import_path": MODEL_IMPORT_PATH,
            "args": {"gateway": config.app_name, "model": model.deployment_args()},
            "deployments": [model_deployment_overrides(model)],
        }
        for model in config.models
    ]
    apps.append(
        {
            "name": config.app_name,
            "route_prefix": config.route_prefix,
            "import_path": INGRESS_IMPORT_PATH,
            "args": {"gateway": config.front_door().model_dump(mode="json")},
            "deployments": [{"name": INGRESS_NAME, "user_config": ingress_user_config(config)}],
        }
    )
    return {"applications": apps}


class DeployFailed(RuntimeError):
    """An application did not start (Serve's message says why: a replica
    failed its start, say); said in one line, not as a traceback."""


def check_cluster_fits(models: Sequence[ModelConfig], ingress_cpus: float = 0.0) -> None:
    """Raises ConfigError when a replica of one of ``models`` fits no node of the
    connected Ray cluster, or all of them beside the ingress replicas'
    ``ingress_cpus`` (in all) do not fit the cluster (they would wait for
    resources forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for model in models:
        check_fits(model, nodes)
    check_together(models, nodes, {"CPU": ingress_cpus})


def deploy(config: GatewayConfig, timeout_s: float = 900) -> dict[str, str]:
    """Applies ``config`` to the Serve instance of the connected Ray cluster.

    Returns when every application is running, with what happened to each
    model it changed (``ADDED``, ``REPLACED``, ``LIVE``, ``REMOVED``, by
    name); raises ConfigError at once
    when a model's replica fits no node, DeployFailed when an application
    fails to deploy and TimeoutError after ``timeout_s``. Applications of the
    cluster that are not this gateway's are kept.
    """
    from ray.serve._private.api import serve_start

    check_cluster_fits(config.models, config.ingress.num_replicas * config.ingress.num_cpus)
    client = serve_start()  # the running Serve instance (started if absent)
    details = client.get_serve_details()
    check_reachable(config, details.get("proxy_location"))
    current = _deployed_apps(details)
    target = {app["name"]: app for app in serve_config(config)["applications"]}
    app_of = {m.name: model_app_name(config.app_name, m.name) for m in config.models}
    models = list(app_of.values())
    ours = _ours(current, config.app_name)
    others = {name: app for name, app in current.items() if name not in ours}
    _check_prefix_free(config, others)
    before = _ingress_models(current, config.app_name)
    starting = [  # models whose replicas this deploy starts (new, new arguments, or scaled another way)
        m for m in config.models
        if current.get(app_of[m.name], {}).get("args") != target[app_of[m.name]]["args"]
        or _rescaled(before.get(m.name), m)
    ]
    for name in models:
        if name in current:
            _keep_replica_count(target[name])
    leaving = set(current) & ours - set(target)
    added = [m for m in starting if app_of[m.name] not in current]
    if added and not leaving and not _fits_now(added):
        # Serve waits for room (an autoscaler may add a node); without one it
        # would wait until ``timeout_s``, saying nothing.
        logger.warning(
            "no room free now for the replicas of %s: Serve starts them as room frees up or nodes join "
            "(waiting up to %.0f s); remove or shrink a model to make room",
            ", ".join(m.name for m in added), timeout_s,
        )
    # When the new models need room the leaving ones hold, steps 1 and 2 are
    # skipped: step 3 alone drains the old replicas while Serve starts the new
    # ones as room frees up (requests for a new model wait for its first replica).
    if not leaving or _fits_now(starting):
        # 1. New and changed models start beside the running ones; running
        # replicas load new adapters but keep the ones leaving until step 3.
        step = {**current, **{name: _adding_first(target[name], current.get(name)) for name in models}}
        if config.app_name not in current:
            step[config.app_name] = target[config.app_name]
        _apply(client, step, models, timeout_s)
        # 2. The ingress routes with the new table.
        step[config.app_name] = target[config.app_name]
        _apply(client, step, [config.app_name], timeout_s)
    # 3. Models no longer listed go (their requests in flight finish first).
    _apply(client, {**others, **target}, list(target), timeout_s)
    _wait_until_gone(client, leaving, timeout_s)
    return _changed(config, current, before, starting, leaving)


def _ingress_models(current: dict[str, dict[str, Any]], app_name: str) -> dict[str, dict[str, Any]]:
    """The models the running ingress was configured with, by name (as ``_dumped``)."""
    ingress = current.get(app_name, {}).get("deployments") or [{}]
    return {m.get("name"): m for m in (ingress[0].get("user_config") or {}).get("models", [])}


def _rescaled(before: dict[str, Any] | None, model: ModelConfig) -> bool:
    """Whether ``model`` switches between a fixed count and autoscaling. Serve
    counts an autoscaling policy in the application's code version (an LLM's
    ``gateway.autoscaling``, a classical model's Serve's own), so the switch
    replaces every replica; an LLM's replicas, had they been kept, would never
    report the load its policy scales by."""
    return before is not None and (before.get("autoscaling") is None) != (model.autoscaling is None)


def _keep_replica_count(app: dict[str, Any]) -> None:
    """Leaves out ``initial_replicas`` of a running model's autoscaling: Serve
    sets the replica count to it again at any change of the deployment's
    config (a batch size, an adapter, ``max_replicas``), so a model scaled
    up under load would drop to it at once."""
    for deployment in app.get("deployments") or []:
        scaling = deployment.get("autoscaling_config")
        if scaling is not None and scaling.get("initial_replicas") is not None:
            deployment["autoscaling_config"] = {**scaling, "initial_replicas": None}


def _changed(
    config: GatewayConfig,
    current: dict[str, dict[str, Any]],
    before: dict[str, dict[str, Any]],
    starting: Sequence[ModelConfig],
    leaving: set[str],
) -> dict[str, str]:
    """What a deploy from the applications ``current`` (whose ingress served
    the models ``before``) did to each model it changed."""
    changed = {m.name: ADDED if m.name not in before else REPLACED for m in starting}
    for model in config.models:
        if model.name not in changed and before.get(model.name) != _dumped(model):
            changed[model.name] = LIVE
    for app in sorted(leaving):
        changed[current[app].get("args", {}).get("model", {}).get("name", app)] = REMOVED
    return changed


def _adding_first(app: dict[str, Any], running: dict[str, Any] | None) -> dict[str, Any]:
    """``app`` (a model's application) as step 1 applies it: where its replicas
    keep running (same arguments), with the LoRA adapters they serve now as
    well as its own, so that an adapter the ingress still routes to is there
    until the ingress routes with the new table."""
    if running is None or running.get("args") != app.get("args"):
        return app
    now, wanted = _adapters(running), _adapters(app)
    if now is None or wanted is None or now.keys() <= wanted.keys():
        return app
    [deployment] = app["deployments"]
    user_config = {**deployment["user_config"], "lora_adapters": {**now, **wanted}}
    return {**app, "deployments": [{**deployment, "user_config": user_config}]}


def _adapters(app: dict[str, Any]) -> dict[str, str] | None:
    """The LoRA adapters an application's model deployment is configured with (None: not a vLLM model)."""
    deployments = app.get("deployments") or [{}]
    adapters = (deployments[0].get("user_config") or {}).get("lora_adapters")
    return adapters if isinstance(adapters, dict) else None


def undeploy(config: GatewayConfig, timeout_s: float) -> None:
    """Removes the gateway's applications (its ingress and models) and returns
    when they are gone: each replica first lets its requests in flight finish,
    within its ``graceful_shutdown_s``. Other applications are kept."""
    from ray.serve._private.api import serve_start

    client = serve_start()
    current = _deployed_apps(client.get_serve_details())
    ours = _ours(current, config.app_name)
    if not ours:
        return
    _apply(client, {name: app for name, app in current.items() if name not in ours}, [], timeout_s)
    _wait_until_gone(client, ours, timeout_s)


def grace_s(config: GatewayConfig) -> float:
    """The longest ``graceful_shutdown_s`` of the gateway ``config`` names,
    as it runs now: its ingress and models, those a ``deploy`` changed since
    ``config`` was read included."""
    from ray.serve._private.api import serve_start

    details = serve_start().get_serve_details()
    applications = details.get("applications") or {}
    deployed = [
        float(deployment.get("deployment_config", {}).get("graceful_shutdown_timeout_s") or 0)
        for name in _ours(_deployed_apps(details), config.app_name)
        for deployment in (applications[name].get("deployments") or {}).values()
    ]
    return max([config.ingress.graceful_shutdown_s, *(m.graceful_shutdown_s for m in config.models), *deployed])


def _ours(apps: dict[str, dict[str, Any]], app_name: str) -> set[str]:
    """The applications of the gateway ``app_name``: its ingress and its models."""
    return {
        name
        for name, app in apps.items()
        if name == app_name
        or (app.get("import_path") == MODEL_IMPORT_PATH and app.get("args", {}).get("gateway") == app_name)
    }


def _fits_now(models: Sequence[ModelConfig]) -> bool:
    """Whether the replicas ``models`` start fit the resources free right now."""
    from ray._private.state import available_resources_per_node

    return fits_free(models, list(available_resources_per_node().values()))


def check_reachable(config: GatewayConfig, proxy_location: str | None) -> None:
    """Raises ConfigError for a route prefix other than ``/`` where Serve runs
    no proxies (the gateway's own front door, ``http_proxy: gateway``): the
    ingress replicas that replace the running ones would take no clients, and
    the gateway would go dark."""
    if proxy_location == "Disabled" and config.route_prefix != "/":
        raise ConfigError(
            f"route_prefix {config.route_prefix!r}: this gateway's own front door serves only `/` "
            "(it was started with `runtime.http_proxy: gateway`); nothing was changed"
        )


def _check_prefix_free(config: GatewayConfig, others: dict[str, dict[str, Any]]) -> None:
    """Raises ConfigError where another application (another gateway's, or
    this one's under its former ``app_name``) has the route prefix."""
    for name, app in others.items():
        if app.get("route_prefix") == config.route_prefix:
            raise ConfigError(
                f"route_prefix {config.route_prefix!r} is application {name!r}'s: a changed `app_name` "
                "starts a second gateway beside the first; keep the app_name, or stop the running gateway first"
            )


def _deployed_apps(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    apps: dict[str, dict[str, Any]] = {}
    for name, app in (details.get("applications") or {}).items():
        deployed = app.get("deployed_app_config")
        if deployed is not None:
            apps[name] = deployed
    return apps


def _wait_until_gone(client: Any, names: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while names & set(client.get_serve_details().get("applications") or {}):
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications {sorted(names)} were not removed in {timeout_s:.0f}s")
        time.sleep(0.2)


def _apply(client: Any, apps: dict[str, dict[str, Any]], wait_for: list[str], timeout_s: float) -> None:
    from ray.serve.schema import ServeDeploySchema

    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))
    for name in wait_for:
        try:
            client._wait_for_application_running(name, timeout_s=int(timeout_s))
        except RuntimeError as exc:  # (Serve's: the application failed, or went)
            raise DeployFailed(f"{exc}{_said(failure_causes(client, name))}") from None
        except TimeoutError as exc:  # (a replica still failing, or waiting for room)
            raise TimeoutError(f"{exc}{_said(failure_causes(client, name, _NOT_RUNNING))}") from None


def _said(causes: list[str]) -> str:
    return "".join(f"\n  {cause}" for cause in causes)


# An exception's line in a traceback: its (dotted) class name, a colon, its message.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt): \S")
_FAILED = ("DEPLOY_FAILED", "UNHEALTHY")
_NOT_RUNNING = (*_FAILED, "UPDATING")  # (Serve's message then says what it waits for)
_MORE_LINES = 3  # of an exception's message, after its first (pydantic's reasons, say)


def failure_causes(client: Any, name: str, statuses: tuple[str, ...] = _FAILED) -> list[str]:
    """Why application ``name``'s deployments failed (or are not running yet),
    one each: Serve says only "Failed to update the deployments" of the
    application, and keeps each replica's traceback in its deployment's message."""
    try:
        app = (client.get_serve_details().get("applications") or {}).get(name) or {}
    except Exception:  # noqa: BLE001 - the cluster went: Serve's own words stand alone
        return []
    return [
        f"{deployment}: {root_cause(details['message'])}"
        for deployment, details in (app.get("deployments") or {}).items()
        if details.get("status") in statuses and details.get("message")
    ]


def root_cause(message: str) -> str:
    """The exception a traceback in ``message`` ends with (the one raised: a
    chain prints the exceptions it was raised from before it), with the next
    lines of its message, else the message's last line."""
    lines = [line.rstrip() for line in message.splitlines()]
    raised = [
        i for i, line in enumerate(lines)
        if _EXCEPTION_LINE.match(line) and not line.endswith("(most recent call last):")
    ]
    if not raised:
        said = [line.strip() for line in lines if line.strip()]
        return said[-1] if said else message
    first = raised[-1]
    said = [lines[first]]
    for line in lines[first + 1 : first + 1 + _MORE_LINES]:
        if not line.strip() or line.lstrip().startswith(("File ", "Traceback ")):
            break
        said.append(line.strip())
    return "\n    ".join(said)
