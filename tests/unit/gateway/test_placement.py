"""gateway/placement.py: deployment options from every placement field, and fail-fast."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.config import ConfigError, ModelConfig, parse_config
from gateway.placement import check_fits, check_together, deployment_options, fits_free
from models.llm import one_node

GPU_NODE = {"CPU": 16.0, "GPU": 4.0, "memory": 1e11}


def model(**fields: Any) -> ModelConfig:
    return parse_config({"models": [{"name": "m", "engine": "echo", **fields}]}).models[0]


def test_single_worker_replica_has_no_placement_group() -> None:
    options = deployment_options(model(num_cpus=0.5, num_gpus=0.5, max_ongoing_requests=8, max_queued_requests=4))
    assert options == {
        "num_replicas": 1,
        "max_ongoing_requests": 8,
        "max_queued_requests": 4,
        "graceful_shutdown_timeout_s": 60,  # in-flight streams may finish on a stop
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5},  # a fractional GPU is shared
    }


def test_tensor_parallel_replica_gets_one_bundle_per_worker_strict_pack() -> None:
    options = deployment_options(model(tensor_parallel_size=4, num_cpus=1, cpus_per_worker=2))
    assert options["placement_group_bundles"] == [
        {"CPU": 3.0, "GPU": 1.0},  # the replica actor's CPU folded into the first
        {"CPU": 2.0, "GPU": 1.0},
        {"CPU": 2.0, "GPU": 1.0},
        {"CPU": 2.0, "GPU": 1.0},
    ]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}


def test_pipeline_stages_multiply_workers_and_strategy_is_honoured() -> None:
    options = deployment_options(
        model(tensor_parallel_size=2, pipeline_parallel_size=2, placement_strategy="SPREAD", gpus_per_worker=0)
    )
    assert len(options["placement_group_bundles"]) == 4
    assert all("GPU" not in bundle for bundle in options["placement_group_bundles"])
    assert options["placement_group_strategy"] == "SPREAD"


def test_a_one_node_vllm_replica_keeps_its_workers_network_on_loopback() -> None:
    options = deployment_options(vllm_model(tensor_parallel_size=2))
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["runtime_env"] == {
        "env_vars": {
            "LLM_GATEWAY_ENGINE_ON_ONE_NODE": "1",  # models.llm.one_node's plugin: a file rendezvous
            "GLOO_SOCKET_IFNAME": "lo",
            "NCCL_SOCKET_IFNAME": "lo",
        }
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"tensor_parallel_size": 2, "placement_strategy": "PACK"},
        {"pipeline_parallel_size": 2, "placement_strategy": "SPREAD"},
    ],
    ids=["pack", "spread"],
)
def test_a_vllm_replica_that_may_span_nodes_keeps_vllms_network(
    fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    assert "runtime_env" not in deployment_options(vllm_model(**fields))["ray_actor_options"]
    # On a cluster of this machine alone it spans nothing: PyTorch's rendezvous store listened on every interface.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert deployment_options(vllm_model(**fields))["ray_actor_options"]["runtime_env"] == {
        "env_vars": one_node.environment()
    }


def test_one_worker_and_other_engines_get_no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert "runtime_env" not in deployment_options(vllm_model(num_gpus=1))["ray_actor_options"]
    assert "runtime_env" not in deployment_options(model(tensor_parallel_size=2))["ray_actor_options"]


def test_autoscaling_replaces_the_replica_count() -> None:
    scaling = {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8, "upscale_delay_s": 5}
    embedder = {"name": "e", "engine": "sentence-transformers", "model": "org/e", "autoscaling": scaling}
    options = deployment_options(parse_config({"models": [embedder]}).models[0])
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": None,
        "target_ongoing_requests": 8.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 600.0,
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"autoscaling": {"max_replicas": 2}, "num_replicas": 2}, "set either `num_replicas` or `autoscaling`"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas is larger than max_replicas"),
        ({"autoscaling": {"max_replicas": 2, "initial_replicas": 5}}, "initial_replicas must lie between"),
        ({"tensor_parallel_size": 2, "num_gpus": 1}, "takes `gpus_per_worker`"),
        ({"gpus_per_worker": 2}, "less than or equal to 1"),
        ({"placement_strategy": "ANYWHERE"}, "STRICT_PACK"),
        # Ray refuses a bundle of nothing, once the model is deployed.
        ({"tensor_parallel_size": 2, "gpus_per_worker": 0, "cpus_per_worker": 0}, "needs some resource"),
    ],
    ids=[
        "both-counts", "min-over-max", "initial-outside", "num-gpus-with-workers", "two-gpus-per-worker", "strategy",
        "empty-bundles",
    ],
)
def test_invalid_placement_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_ongoing_requests": 1, "max_queued_requests": 1},
        {"max_queued_requests": -1, "graceful_shutdown_s": 0},
        {"num_cpus": 0.001, "num_gpus": 0.5},
        {"engine": "sentence-transformers", "model": "org/e",
         "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0}},
        {"autoscaling": {"target_ongoing_requests": 0.01, "upscale_delay_s": 0, "downscale_delay_s": 0}},
        {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},  # an LLM's: with its policy
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "placement_strategy": "SPREAD"},
        {"engine": "sklearn", "model": "models:/iris/1", "max_batch_size": 1, "batch_wait_timeout_s": 0},
    ],
    ids=[
        "smallest-queue", "no-bound-no-grace", "small-resources", "scale-to-zero", "eager-scaling", "llm-scaling",
        "workers", "batching",
    ],
)
def test_serve_takes_the_options_of_every_config_the_schema_accepts(fields: dict[str, Any]) -> None:
    # Serve validates deployment options only when the model is deployed,
    # after the gateway has started: a value the schema lets through and
    # Serve refuses would fail there instead of at config load.
    from ray import serve

    class Replica:
        pass

    serve.deployment(Replica).options(name="m", **deployment_options(model(**fields)))


def test_tensor_parallel_classical_model_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="`tensor_parallel_size` is not a setting of sentence-transformers models"):
        parse_config({"models": [{"name": "e", "engine": "sentence-transformers", "model": "org/e", "tensor_parallel_size": 2}]})


def test_replica_that_fits_one_node_passes() -> None:
    check_fits(model(tensor_parallel_size=4, num_cpus=1), [GPU_NODE, GPU_NODE])


def test_tp8_on_four_gpu_nodes_fails_naming_model_bundles_and_largest_node() -> None:
    with pytest.raises(ConfigError) as caught:
        check_fits(model(tensor_parallel_size=8, num_cpus=1), [GPU_NODE, {"CPU": 8.0, "GPU": 2.0}])
    message = str(caught.value)
    assert message.startswith("models[m]: a replica needs bundles [{CPU: 2, GPU: 1}, {CPU: 1, GPU: 1}")
    assert "placed STRICT_PACK ({CPU: 9, GPU: 8} in all)" in message
    assert message.endswith("the largest node has {CPU: 16, GPU: 4}")


def test_spread_may_use_several_nodes_but_each_bundle_must_fit_one() -> None:
    spread = model(tensor_parallel_size=8, placement_strategy="PACK")
    check_fits(spread, [GPU_NODE, GPU_NODE])  # 8 GPUs over two nodes
    with pytest.raises(ConfigError, match="placed PACK"):
        check_fits(spread, [GPU_NODE])
    strict = model(tensor_parallel_size=3, placement_strategy="STRICT_SPREAD")
    with pytest.raises(ConfigError, match="placed STRICT_SPREAD"):
        check_fits(strict, [GPU_NODE, GPU_NODE])
    check_fits(strict, [GPU_NODE, GPU_NODE, GPU_NODE])


def test_single_worker_replica_must_fit_a_node_too() -> None:
    with pytest.raises(ConfigError, match=r"needs bundles \{CPU: 0.5, GPU: 2\}"):
        check_fits(model(num_gpus=2), [GPU_NODE | {"GPU": 1.0}])
    check_fits(model(num_gpus=0.5), [GPU_NODE])


def test_fits_free_places_every_starting_replica_together() -> None:
    one_node_free = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 0.0}]
    assert fits_free([model(tensor_parallel_size=4)], one_node_free)
    assert not fits_free([model(tensor_parallel_size=4, num_replicas=2)], one_node_free)
    assert not fits_free([model(tensor_parallel_size=2), model(tensor_parallel_size=4)], one_node_free)
    assert fits_free([model(tensor_parallel_size=4, num_replicas=2)], [GPU_NODE, GPU_NODE])
    scaling = {"min_replicas": 1, "max_replicas": 3}
    scaled = model(engine="sentence-transformers", model="org/e", num_gpus=4, autoscaling=scaling)
    assert fits_free([scaled], one_node_free)  # starts with min_replicas


@pytest.mark.parametrize("gpus", [0, 0.5])
def test_a_vllm_replica_of_several_workers_takes_a_whole_gpu_each(gpus: float) -> None:
    # 0 (CPU): vLLM's CPU backend runs no Ray workers, and the replica never
    # started; 0.5: each of vLLM's workers asks for a whole GPU, which the
    # bundle never holds, and the replica waited for the deploy's timeout.
    vllm = {"name": "m", "engine": "vllm", "model": "org/model", "tensor_parallel_size": 2, "gpus_per_worker": gpus}
    with pytest.raises(ConfigError, match="needs `gpus_per_worker: 1`"):
        parse_config({"models": [vllm]})
    assert parse_config({"models": [{**vllm, "gpus_per_worker": 1}]}).models[0].workers == 2
    assert model(tensor_parallel_size=2, gpus_per_worker=gpus).workers == 2  # the echo engine's workers take what they are given


def vllm_model(**fields: Any) -> ModelConfig:
    return parse_config({"models": [{"name": "v", "engine": "vllm", "model": "org/v", **fields}]}).models[0]


def test_a_one_worker_vllm_model_on_a_cluster_with_gpus_must_say_whether_it_takes_one() -> None:
    # Given none, Ray hides no GPU from it: vLLM takes the node's first, which another replica may hold.
    with pytest.raises(ConfigError, match=r"models\[v\]: the cluster has GPUs.*set `num_gpus: 1`"):
        check_fits(vllm_model(), [GPU_NODE])
    check_fits(vllm_model(num_gpus=1), [GPU_NODE])
    check_fits(vllm_model(num_gpus=0), [GPU_NODE])  # written out: run without one
    check_fits(vllm_model(), [{"CPU": 16.0}])  # no GPU anywhere: the CPU engine
    check_fits(vllm_model(tensor_parallel_size=2), [GPU_NODE])  # (its workers' bundles take theirs)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"num_gpus": 2}, "a vLLM replica of one worker uses one GPU; for more, set `tensor_parallel_size`"),
        ({"num_gpus": 0.5}, "`num_gpus: 0.5` shares a GPU, but vLLM takes 0.92 of its memory"),
        # vLLM wants its whole share free at start: beside the other's share and each CUDA context.
        ({"num_gpus": 0.5, "gpu_memory_utilization": 0.5}, "set `gpu_memory_utilization` to at most 0.45"),
        # A share too small for any: the message asked for "at most -0.02".
        ({"num_gpus": 0.03, "gpu_memory_utilization": 0.01}, "leaves vLLM no memory beside its CUDA context"),
    ],
)
def test_a_vllm_replicas_gpu_share_is_one_its_engine_can_use(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        vllm_model(**fields)
    vllm_model(num_gpus=0.5, gpu_memory_utilization=0.45)  # two such replicas share one GPU


def test_a_one_worker_vllm_replica_given_no_gpu_hides_every_gpu_from_vllm() -> None:
    from models.llm.vllm_engine import hides_gpus

    assert hides_gpus(vllm_model()) and hides_gpus(vllm_model(num_gpus=0))
    assert not hides_gpus(vllm_model(num_gpus=1))
    assert not hides_gpus(vllm_model(num_gpus=0.5, gpu_memory_utilization=0.4))
    assert not hides_gpus(vllm_model(tensor_parallel_size=2))  # (its workers are given theirs)


def test_replicas_that_each_fit_a_node_but_not_the_cluster_together_are_refused() -> None:
    # Each fits a 4-GPU node alone: two replicas, or one beside another model, need more than one node has.
    def models(replicas: int) -> list[ModelConfig]:
        return parse_config({"models": [
            {"name": "big", "engine": "echo", "tensor_parallel_size": 4, "num_replicas": replicas, "num_cpus": 1},
            {"name": "small", "engine": "echo", "num_gpus": 0.5, "num_cpus": 0.5},
        ]}).models

    check_together(models(1), [GPU_NODE, GPU_NODE])
    check_together(models(2)[:1], [GPU_NODE, GPU_NODE])  # a node each
    with pytest.raises(ConfigError) as caught:
        check_together(models(2), [GPU_NODE, GPU_NODE])
    assert str(caught.value) == (
        "the models' starting replicas need {GPU: 8.5} in all, more than the cluster has ({CPU: 32, GPU: 8})"
        "; GPUs by model: big: 2 x {CPU: 5, GPU: 4}, small: 1 x {CPU: 0.5, GPU: 0.5}"
    )
    scaled = model(tensor_parallel_size=4, autoscaling={"min_replicas": 1, "max_replicas": 8})
    check_together([scaled], [GPU_NODE])  # (its starting replicas: those it needs)


def test_models_that_fill_the_cluster_leave_room_for_the_ingress_or_are_refused() -> None:
    # Two 1-CPU models on a 2-CPU node: the ingress found no room, and a deploy waited 900 s for it.
    models = parse_config({"models": [
        {"name": "a", "engine": "echo", "num_cpus": 1}, {"name": "b", "engine": "echo", "num_cpus": 1},
    ]}).models
    check_together(models, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match=r"starting replicas and the ingress need \{CPU: 2.25\} in all"):
        check_together(models, [{"CPU": 2.0}], {"CPU": 0.25})
