"""vLLM's Ray worker, meeting the engine's other workers through a file on
their shared node rather than a TCP port (``models.llm.one_node``). Imported
only where vLLM is: by the plugin in the engine-core process, and by Ray in
each worker, which loads the class from here."""

from __future__ import annotations

from vllm.utils.network_utils import get_file_store_init_method
from vllm.v1.executor.ray_executor_v2 import RayWorkerProc


class OneNodeWorkerProc(RayWorkerProc):
    def create_dist_init_method(self) -> str:
        # vLLM's own opens a TCPStore, which PyTorch binds on every interface;
        # a ``file://`` method makes every worker open a FileStore there instead.
        return get_file_store_init_method()
