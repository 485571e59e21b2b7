"""Placement scenarios on a simulated multi-node cluster, run in a process of its own.

``python -m tests.integration.cluster_scenarios`` starts a
``ray.cluster_utils.Cluster`` (a CPU head and two nodes declaring 4 GPUs
each), deploys echo models through the gateway's own deploy path and prints
what it observed as one JSON object on the last line. The test session's own
Ray cluster lives in the pytest process, hence the separate process.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

NODE = {"num_cpus": 4, "num_gpus": 4}


def echo(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "echo", "num_cpus": 0.25, "cpus_per_worker": 0.25, **fields}


def placement(app: str, model: str) -> list[dict[str, Any]]:
    """Per replica of ``model``: its node and its bundles' nodes and strategy."""
    import ray

    from gateway import status

    found = status.collect(app)["applications"][f"{app}:{model}"]["deployments"]
    (deployment,) = found.values()
    groups = {g["name"]: g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"}
    out = []
    for replica in deployment["replicas"]:
        group = next(g for name, g in groups.items() if replica["replica_id"] in name)
        out.append({
            "node": replica["node_id"],
            "bundle_nodes": list(group["bundles_to_node_id"].values()),
            "strategy": group["strategy"],
        })
    return out


def main() -> None:
    os.environ.update({"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"})
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from gateway.config import ConfigError, parse_config
    from gateway.deploy import deploy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_nodes = [cluster.add_node(**NODE).node_id for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    seen: dict[str, Any] = {"gpu_nodes": gpu_nodes}

    def run(models: list[dict[str, Any]]) -> None:
        deploy(parse_config({"app_name": "sim", "ingress": {"num_cpus": 0.1}, "models": models}))

    def reset() -> None:
        """An empty cluster, so best-effort strategies see every node free."""
        for name in list(serve.status().applications):
            serve.delete(name)

    try:
        run([echo("tp4", tensor_parallel_size=4)])
        seen["tp4"] = placement("sim", "tp4")
        # Needs both GPU nodes while tp4 holds one: tp4 leaves as tp4x2 starts.
        run([echo("tp4x2", tensor_parallel_size=4, num_replicas=2)])
        seen["tp4x2"] = placement("sim", "tp4x2")
        reset()
        run([echo("pack6", tensor_parallel_size=6, placement_strategy="PACK")])
        seen["pack6"] = placement("sim", "pack6")
        reset()
        run([echo("spread2", tensor_parallel_size=2, placement_strategy="SPREAD")])
        seen["spread2"] = placement("sim", "spread2")
        started = time.monotonic()
        try:
            run([echo("tp8", tensor_parallel_size=8)])
            seen["tp8"] = {"error": None}
        except ConfigError as exc:
            seen["tp8"] = {"error": str(exc), "seconds": time.monotonic() - started}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
