"""`llm-gateway status`: each deployment's replicas, their nodes and placement."""

from __future__ import annotations

from typing import Any

from gateway.placement import format_bundles


def collect(app_name: str) -> dict[str, Any]:
    """The gateway's deployments as Serve and Ray report them (needs ``ray.init``).

    ``{"applications": {app: {"status", "deployments": {name: {"status",
    "placement_strategy", "bundles", "replicas": [{"replica_id", "state",
    "node_id", "node_ip", "pid", "strategy", "bundles", "bundle_nodes"}]}}}}}``
    (placement fields are None for replicas without a placement group).
    """
    import ray
    from ray.serve.context import _get_global_client

    # (Looking must not start Serve on a cluster that runs none: Serve would
    # take its defaults there, and a later `serve --host` be ignored.)
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {"applications": {}}
    details = client.get_serve_details()
    groups = list(ray.util.placement_group_table().values())
    out: dict[str, Any] = {}
    for name, app in sorted((details.get("applications") or {}).items()):
        if name != app_name and not name.startswith(app_name + ":"):
            continue
        deployments = {}
        for dep_name, dep in sorted(app.get("deployments", {}).items()):
            replicas = [_replica(r, groups) for r in dep.get("replicas", [])]
            placed = next((r for r in replicas if r["bundles"]), None)
            deployments[dep_name] = {
                "status": _plain(dep.get("status")),
                "placement_strategy": placed["strategy"] if placed else None,
                "bundles": placed["bundles"] if placed else None,
                "replicas": replicas,
            }
        out[name] = {"status": _plain(app.get("status")), "deployments": deployments}
    return {"applications": out}


def _replica(replica: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    replica_id = replica.get("replica_id", "")
    group = next(
        (g for g in groups if g.get("state") == "CREATED" and replica_id and replica_id in g.get("name", "")),
        None,
    )
    # What the placement group actually holds, not what was asked for.
    return {
        "replica_id": replica_id,
        "state": _plain(replica.get("state")),
        "node_id": replica.get("node_id"),
        "node_ip": replica.get("node_ip"),
        "pid": replica.get("pid"),
        "strategy": group["strategy"] if group else None,
        "bundles": list(group["bundles"].values()) if group else None,
        "bundle_nodes": list(group["bundles_to_node_id"].values()) if group else None,
    }


def _plain(value: Any) -> Any:
    """Serve's status enums as their plain string values."""
    return getattr(value, "value", value)


def render(status: dict[str, Any]) -> str:
    """The human-readable form of ``collect()``'s result."""
    lines = []
    for app_name, app in status["applications"].items():
        lines.append(f"{app_name}  [{app['status']}]")
        for name, dep in app["deployments"].items():
            placement = (
                f"  {dep['placement_strategy']} {format_bundles(dep['bundles'])}" if dep["bundles"] else ""
            )
            lines.append(f"  {name}  [{dep['status']}]{placement}")
            for r in dep["replicas"]:
                where = f"node {_short(r['node_id'])} ({r['node_ip']})"
                spread = ""
                if r["bundle_nodes"]:
                    spread = "  bundles on " + ", ".join(_short(n) for n in r["bundle_nodes"])
                lines.append(f"    replica {r['replica_id']}  {r['state']}  {where}  pid {r['pid']}{spread}")
    return "\n".join(lines) if lines else "no application of this gateway is running"


def _short(node_id: str | None) -> str:
    return (node_id or "?")[:8]

