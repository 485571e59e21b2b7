"""vLLM's Ray worker, meeting the engine's other workers through a file on
their shared node rather than a TCP port (``models.llm.one_node``). Imported
only where vLLM is: by the plugin in the engine-core process, and by Ray in
each worker, which loads the class from here."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from vllm.utils.network_utils import aiter_requires_tcp_store, get_file_store_init_method
from vllm.v1.executor.ray_executor_v2 import RayWorkerProc


class OneNodeWorkerProc(RayWorkerProc):
    """vLLM's Ray worker whose rendezvous, made by the first worker, is a file."""

    def create_dist_init_method(self) -> str:
        # vLLM's own opens a TCPStore, which PyTorch binds on every interface;
        # a ``file://`` method makes every worker open a FileStore there instead
        # (except where ROCm's AITER all-reduce needs a TCPStore, as vLLM's
        # multiprocessing executor keeps one there).
        if aiter_requires_tcp_store():
            return super().create_dist_init_method()
        return get_file_store_init_method()


def loopback_by_file(init_method: Callable[[str, int], str]) -> Callable[[str, int], str]:
    """``init_method`` (vLLM's ``get_distributed_init_method``), except that a
    loopback rendezvous, which only one node's workers can share, is a file."""

    def one_node(ip: str, port: int) -> str:
        if ipaddress.ip_address(ip).is_loopback and not aiter_requires_tcp_store():
            return get_file_store_init_method()
        return init_method(ip, port)

    one_node.__wrapped__ = init_method  # type: ignore[attr-defined]
    return one_node
