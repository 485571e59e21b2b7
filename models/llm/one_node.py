"""A multi-worker vLLM replica placed on one node (STRICT_PACK, the default)
keeps its workers' rendezvous and collective sockets on that node's loopback.

vLLM's Ray executor (its default, ``RayExecutorV2``) has its first worker
create a PyTorch ``TCPStore`` for the workers' rendezvous, and PyTorch binds
that store's port on every interface (``::``) whatever host it is given; the
store stays open as long as the engine. Gloo (vLLM's CPU-side process group)
listens on the address the machine's host name resolves to, and NCCL's
bootstrap and proxy sockets on the first network interface it finds. On one
node none of them needs the network, so for such a replica:

- ``environment()`` is added to the replica's runtime environment, which
  vLLM passes on to its workers: Gloo and NCCL use the loopback interface;
- ``register`` (a vLLM general plugin, entry point
  ``llm_gateway_one_node``, run by vLLM in its engine-core process before the
  executor starts) then swaps the executor's worker class for
  ``models.llm.one_node_worker.OneNodeWorkerProc``, whose rendezvous is a
  file (``torch.distributed.FileStore``, as vLLM's own multiprocessing
  executor uses on one node) instead of a port; vLLM's older Ray executor
  (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``), which picks the rendezvous in
  the engine-core process, is given a file for its loopback one too.

Replicas placed PACK, SPREAD or STRICT_SPREAD may span nodes and keep vLLM's
defaults.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Set in the replica's environment (inherited by vLLM's engine-core process)
# when its workers share one node.
ONE_NODE = "LLM_GATEWAY_ENGINE_ON_ONE_NODE"
LOOPBACK_INTERFACE = "lo"


def environment() -> dict[str, str]:
    """The variables a one-node multi-worker replica runs with."""
    return {
        ONE_NODE: "1",
        "GLOO_SOCKET_IFNAME": LOOPBACK_INTERFACE,
        "NCCL_SOCKET_IFNAME": LOOPBACK_INTERFACE,
    }


def register() -> None:
    """vLLM's general-plugin hook: in an engine whose workers share one node,
    its Ray executor starts workers whose rendezvous listens on no port.
    Elsewhere (any process without ``ONE_NODE``) it does nothing. (An
    environment variable, since vLLM's engine-core process is reached by
    nothing else of the replica's before its executor starts.)"""
    if os.environ.get(ONE_NODE) != "1":
        return
    from vllm.v1.executor import ray_executor, ray_executor_v2

    from models.llm.one_node_worker import OneNodeWorkerProc, loopback_by_file

    if ray_executor_v2.RayWorkerProc is not OneNodeWorkerProc:
        ray_executor_v2.RayWorkerProc = OneNodeWorkerProc  # type: ignore[misc]
        # vLLM's older Ray executor picks the rendezvous itself, 127.0.0.1 on one node.
        ray_executor.get_distributed_init_method = loopback_by_file(  # type: ignore[assignment]
            ray_executor.get_distributed_init_method
        )
        logger.info("vLLM's workers meet through a file: they share one node")


def unguarded() -> str | None:
    """In a replica whose engine's workers share one node: why their
    rendezvous would listen on a port, if it would (vLLM's plugins loaded
    here, as its engine-core process loads them); else None."""
    if os.environ.get(ONE_NODE) != "1":
        return None
    from vllm.plugins import load_general_plugins
    from vllm.v1.executor import ray_executor_v2

    load_general_plugins()

    from models.llm.one_node_worker import OneNodeWorkerProc

    if ray_executor_v2.RayWorkerProc is OneNodeWorkerProc:
        return None
    return (
        "vLLM did not run the gateway's plugin `llm_gateway_one_node`, so its workers' rendezvous "
        "(a PyTorch TCPStore) listens on every interface: reinstall the gateway's package "
        "(its entry point registers the plugin), and name the plugin in VLLM_PLUGINS if that is set"
    )
