"""Serve's autoscaling for LLM models, whose requests Serve does not route.

An LLM's streams and answers go by its replicas' own relay port, so Serve's
count of a deployment's requests (``total_num_requests``) misses them and its
default policy would never add a replica. Each LLM replica reports the
requests relayed to it now (``LLMServer.record_autoscaling_stats``, as
``RELAYED``); ``relayed_load_policy`` is Serve's default policy counting
those too: as many replicas as the requests make ``target_ongoing_requests``
each. Serve applies the rest as for its own (``min_replicas``,
``max_replicas``, the delays and factors).

Serve pickles the policy by value: this module imports nothing of its own.
"""

from __future__ import annotations

from typing import Any

RELAYED = "relayed_requests"
POLICY = "gateway.autoscaling:relayed_load_policy"


def relayed_load_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Replicas for the requests Serve routed and those relayed to the
    replicas (each replica's ``RELAYED``, averaged over Serve's look-back
    window), ``target_ongoing_requests`` each. ``ctx``: Serve's ``AutoscalingContext``."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    relayed = sum((ctx.aggregated_metrics or {}).get(RELAYED, {}).values())
    return (ctx.total_num_requests + relayed) / ctx.config.get_target_ongoing_requests(), {}
