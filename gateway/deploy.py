"""Deploys the gateway the way ``serve deploy`` does, so routing changes are live.

Serve rebuilds an application (and restarts its replicas) when its import
path or arguments change; otherwise it only applies the deployment overrides
of the new Serve config. The gateway's Serve config therefore keeps the routing
table out of the arguments and passes it as the ingress's ``user_config``
override: a change of weights or routes reconfigures the running ingress and
leaves every model replica running. Any other change (a model added, removed
or altered) changes the arguments' digest and rebuilds the application.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig

IMPORT_PATH = "gateway.app:app_builder"
INGRESS_NAME = "GatewayIngress"


def serve_config(config: GatewayConfig, config_path: Path, base_dir: Path) -> dict[str, Any]:
    """The Serve deploy config (``serve deploy`` format) for ``config``."""
    static = config.without_routing().model_dump_json()
    digest = hashlib.sha256(static.encode()).hexdigest()[:16]
    return {
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": config.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {
                    "config": str(config_path.resolve()),
                    "base_dir": str(base_dir.resolve()),
                    "digest": digest,
                },
                "deployments": [
                    {
                        "name": INGRESS_NAME,
                        "user_config": {"routing": config.routing.model_dump(mode="json")},
                    }
                ],
            }
        ]
    }


def deploy(
    config: GatewayConfig, config_path: Path, base_dir: Path, timeout_s: float = 900
) -> None:
    """Applies ``config`` to the Serve instance of the connected Ray cluster.

    Returns when the application is running; raises RuntimeError when it
    fails to deploy and TimeoutError after ``timeout_s``.
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    client = serve_start()  # the running Serve instance (started if absent)
    client.deploy_apps(ServeDeploySchema.model_validate(serve_config(config, config_path, base_dir)))
    client._wait_for_application_running(config.app_name, timeout_s=int(timeout_s))
