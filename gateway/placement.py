"""Where a model's replicas run: Serve deployment options from a model's config.

Pure functions (no Ray calls), so every field's effect is unit-tested.

A replica with more than one engine worker (tensor x pipeline parallel) gets a
placement group with one bundle per worker; the replica actor's own CPUs are
folded into the first bundle, where Serve places it. vLLM, started inside the
replica, finds that group (``ray.util.get_current_placement_group``) and puts
one worker on each bundle. The strategy is STRICT_PACK unless the config asks
otherwise: all workers of a replica on one node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from gateway import autoscaling
from gateway.config import ClassicalModelConfig, ConfigError, LLMModelConfig, ModelConfig, VLLMModelConfig
from models.llm import one_node

Bundle = dict[str, float]


def replica_bundles(model: ModelConfig) -> list[Bundle] | None:
    """One bundle per worker, the replica actor's CPUs in the first; None for one worker."""
    if not isinstance(model, LLMModelConfig) or model.workers == 1:
        return None
    worker: Bundle = {"CPU": model.cpus_per_worker}
    if model.gpus_per_worker > 0:
        worker["GPU"] = model.gpus_per_worker
    first = {**worker, "CPU": model.cpus_per_worker + model.num_cpus}
    return [first] + [dict(worker) for _ in range(model.workers - 1)]


def placement_strategy(model: ModelConfig) -> str | None:
    """The bundles' strategy: the config's, else STRICT_PACK; None for one worker."""
    if not isinstance(model, LLMModelConfig) or model.workers == 1:
        return None
    return model.placement_strategy or "STRICT_PACK"


def autoscaling_config(model: ModelConfig) -> dict[str, Any] | None:
    """Ray Serve's ``autoscaling_config`` for the model, or None for a fixed
    count; an LLM's counts its relayed requests (``gateway.autoscaling``)."""
    scaling = model.autoscaling
    if scaling is None:
        return None
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.initial_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
    }
    if model.kind == "llm":
        config["policy"] = {"policy_function": autoscaling.POLICY}
    return config


def live_options(model: ModelConfig) -> dict[str, Any]:
    """The options a redeploy applies without a restart: ``num_replicas`` or
    ``autoscaling_config``, and as ``user_config`` a classical model's batching
    or a vLLM model's LoRA adapters."""
    scaling = autoscaling_config(model)
    options: dict[str, Any] = (
        {"autoscaling_config": scaling} if scaling else {"num_replicas": model.num_replicas}
    )
    if isinstance(model, ClassicalModelConfig):
        options["user_config"] = model.batching()
    elif isinstance(model, VLLMModelConfig):
        options["user_config"] = model.replica_user_config()
    return options


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """The Serve deployment options for ``model``'s replicas."""
    bundles = replica_bundles(model)
    options: dict[str, Any] = {
        **live_options(model),
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        # Serve waits for the requests it counts, then calls the replica's
        # ``__del__``, which waits for its relayed streams with what is left;
        # the controller kills the replica at this deadline.
        "graceful_shutdown_timeout_s": model.graceful_shutdown_s,
        # With bundles, the actor's GPUs are its workers': the actor takes none.
        "ray_actor_options": {
            "num_cpus": model.num_cpus,
            "num_gpus": model.num_gpus if bundles is None else 0,
        },
    }
    if bundles is not None:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = placement_strategy(model)
    one_node_only = placement_strategy(model) == "STRICT_PACK" or on_one_machine()
    if isinstance(model, VLLMModelConfig) and bundles is not None and one_node_only:
        # vLLM's workers pass it on: their rendezvous and collectives stay on
        # the node's loopback (models.llm.one_node).
        options["ray_actor_options"]["runtime_env"] = {"env_vars": one_node.environment()}
    return options


def on_one_machine() -> bool:
    """Whether the cluster is one machine's alone (Ray's services on its
    loopback, as ``llm-gateway serve`` starts it): every replica then runs
    there, whatever its placement strategy. Read where Serve builds the
    application, a task of the cluster's, whose environment is its raylet's."""
    return os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"


def check_fits(model: ModelConfig, nodes: Sequence[Mapping[str, float]]) -> None:
    """Raises ConfigError when one replica of ``model`` could never be placed.

    ``nodes`` are the cluster's nodes' total resources. A replica that cannot
    fit would leave its deployment pending forever; this says so at once,
    naming the model, its bundles and the largest node.
    """
    bundles = replica_bundles(model) or [_actor_bundle(model)]
    strategy = placement_strategy(model) or "STRICT_PACK"
    if not nodes:
        raise ConfigError(f"models[{model.name}]: the cluster has no alive node")
    _check_gpu_taken(model, nodes)
    if strategy == "STRICT_PACK":
        fits = any(_covers(node, _total(bundles)) for node in nodes)
    elif strategy == "STRICT_SPREAD":
        fits = _spreads(bundles, nodes)
    else:
        fits = all(any(_covers(node, b) for node in nodes) for b in bundles) and _covers(
            _total(nodes), _total(bundles)
        )
    if not fits:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise ConfigError(
            f"models[{model.name}]: a replica needs bundles {_show(bundles)} placed "
            f"{strategy} ({_show([_total(bundles)])} in all), but no node can hold them; "
            f"the largest node has {_show([_useful(largest)])}"
        )


def _check_gpu_taken(model: ModelConfig, nodes: Sequence[Mapping[str, float]]) -> None:
    """A vLLM replica of one worker on a cluster with GPUs says whether it
    takes one: left unset, a user on a GPU cluster most likely forgot it.
    ``num_gpus: 0`` written out runs it without one (its replica hides every
    GPU from vLLM: for vLLM's CPU build)."""
    if not isinstance(model, VLLMModelConfig) or model.workers > 1 or "num_gpus" in model.model_fields_set:
        return
    if any(node.get("GPU", 0) > 0 for node in nodes):
        raise ConfigError(
            f"models[{model.name}]: the cluster has GPUs, and this vLLM model reserves none: set "
            "`num_gpus: 1`, or `num_gpus: 0` to run it without a GPU (vLLM's CPU build)"
        )


def _actor_bundle(model: ModelConfig) -> Bundle:
    bundle: Bundle = {"CPU": model.num_cpus}
    if model.num_gpus > 0:
        bundle["GPU"] = model.num_gpus
    return bundle


def _total(bundles: Sequence[Mapping[str, float]]) -> Bundle:
    total: Bundle = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    return total


def _covers(node: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(node.get(key, 0) + 1e-9 >= value for key, value in need.items())


def _spreads(bundles: Sequence[Bundle], nodes: Sequence[Mapping[str, float]]) -> bool:
    """Each bundle on a different node (greedy: bundles are alike)."""
    free = [dict(node) for node in nodes]
    for bundle in bundles:
        spot = next((node for node in free if _covers(node, bundle)), None)
        if spot is None:
            return False
        free.remove(spot)
    return True


def _useful(node: Mapping[str, float]) -> Bundle:
    return {key: node[key] for key in ("CPU", "GPU") if key in node}


def format_bundles(bundles: Sequence[Mapping[str, float]]) -> str:
    """``[{CPU: 2, GPU: 1}, ...]``: bundles as error messages and `status` show them."""
    return "[" + ", ".join(_format_bundle(b) for b in bundles) + "]"


def _format_bundle(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _show(bundles: Sequence[Mapping[str, float]]) -> str:
    return format_bundles(bundles) if len(bundles) != 1 else _format_bundle(bundles[0])


def fits_free(models: Sequence[ModelConfig], free: Sequence[Mapping[str, float]]) -> bool:
    """Whether every starting replica of ``models`` fits the ``free`` resources
    per node together (greedy, first fit), as the scheduler would place them."""
    left = [dict(node) for node in free]
    for model in models:
        bundles = replica_bundles(model) or [_actor_bundle(model)]
        strict = (placement_strategy(model) or "STRICT_PACK") == "STRICT_PACK"
        groups = [_total(bundles)] if strict else [dict(b) for b in bundles]
        for _ in range(_starting_replicas(model)):
            for need in groups:
                spot = next((node for node in left if _covers(node, need)), None)
                if spot is None:
                    return False
                for key, value in need.items():
                    spot[key] = spot.get(key, 0) - value
    return True


def _starting_replicas(model: ModelConfig) -> int:
    scaling = model.autoscaling
    if scaling is None:
        return model.num_replicas
    return scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas


def check_together(
    models: Sequence[ModelConfig], nodes: Sequence[Mapping[str, float]], ingress: Bundle | None = None
) -> None:
    """Raises ConfigError when the starting replicas of ``models`` together,
    beside the ingress replicas' ``ingress`` (all of them), need more GPUs or
    CPUs than ``nodes`` (the cluster's totals) have in all: each fitting a
    node alone, Serve would wait for room that never comes."""
    need: Bundle = dict(ingress or {})
    parts = []
    for model in models:
        replicas = _starting_replicas(model)
        each = _total(replica_bundles(model) or [_actor_bundle(model)])
        for key in ("CPU", "GPU"):
            need[key] = need.get(key, 0) + replicas * each.get(key, 0)
        if each.get("GPU", 0) > 0:
            parts.append(f"{model.name}: {replicas} x {_format_bundle(_useful(each))}")
    have = _useful(_total(nodes))
    short = [key for key, value in need.items() if value > have.get(key, 0) + 1e-9]
    if short:
        beside = " and the ingress" if (ingress or {}).get("CPU") and "CPU" in short else ""
        raise ConfigError(
            f"the models' starting replicas{beside} need "
            f"{_format_bundle({k: need[k] for k in short})} in all, "
            f"more than the cluster has ({_format_bundle(have)})"
            + (f"; GPUs by model: {', '.join(parts)}" if "GPU" in short and parts else "")
        )

