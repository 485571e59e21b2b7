"""llm-gateway: an OpenAI-compatible LLM gateway on Ray Serve."""

__version__ = "0.1.0"

# In a Serve replica of a local cluster, before the replica starts its servers.
from gateway.local_cluster import loopback_replica_servers as _loopback_replica_servers  # noqa: E402

_loopback_replica_servers()
