"""The ingress deployment: FastAPI under @serve.ingress, CPU only.

It never imports vllm or torch; model replicas are reached only through the
DeploymentHandles it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from ray import serve

from gateway.config import GatewayConfig, RoutingConfig
from gateway.http.api import build_api
from gateway.http.state import GatewayState


@serve.ingress()
class GatewayIngress:
    def __init__(self, config: GatewayConfig, handles: Mapping[str, Any]) -> None:
        self._state = GatewayState(config, handles)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the routing table, at start and on every redeploy.

        Routing changes apply to requests that arrive afterwards; requests in
        flight keep the variant they were given. The replica is not restarted.
        """
        self._state.apply_routing(RoutingConfig.model_validate(user_config["routing"]))

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built in the replica, after __init__, so the app holds this replica's state.
        return build_api(self._state)
