"""What one ingress replica knows: the config, the dispatcher, model metadata."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from gateway.config import GatewayConfig, RoutingConfig
from gateway.http.dispatch import ModelDispatcher
from gateway.protocol.models import AliasVariant, ModelCard
from gateway.routing.table import Alias, RouteTable
from gateway.routing.weighted import Variant

logger = logging.getLogger(__name__)

INFO_TIMEOUT_S = 2.0


def _route_table(config: GatewayConfig) -> RouteTable:
    aliases = {
        route.name: Alias(
            variants=[Variant(name, weight) for name, weight in route.variants.items()],
            fallback=route.fallback,
            shadow=route.shadow.variant if route.shadow else None,
            shadow_percent=route.shadow.percent if route.shadow else 0.0,
        )
        for route in config.routing.routes
    }
    return RouteTable((m.name for m in config.models), aliases)


class GatewayState:
    """Bound to the FastAPI app as ``app.state.gateway`` by the ingress replica."""

    def __init__(self, config: GatewayConfig, handles: Mapping[str, Any]) -> None:
        self.config = config
        self.dispatcher = ModelDispatcher(
            _route_table(config), handles, config.ingress.retry_after_s, config.routing.cohort_header
        )
        self._handles = dict(handles)
        self._created = int(time.time())
        self._context: dict[str, int | None] = {m.name: m.max_model_len for m in config.models}

    def apply_routing(self, routing: RoutingConfig) -> None:
        """Swaps in a new routing table (validated against this replica's models)."""
        config = GatewayConfig.model_validate({**self.config.model_dump(), "routing": routing})
        self.config = config
        self.dispatcher.use_routes(_route_table(config), routing.cohort_header)

    @property
    def routes(self) -> RouteTable:
        """The table requests are routed with now."""
        return self.dispatcher.routes

    def model_cards(self) -> list[ModelCard]:
        """Concrete models, then aliases with their variants and weights."""
        models = [
            ModelCard(
                id=m.name,
                created=self._created,
                root=m.model,
                max_model_len=self._context.get(m.name),
            )
            for m in self.config.models
        ]
        aliases = [
            ModelCard(
                id=name,
                created=self._created,
                variants=[AliasVariant(id=v.name, weight=v.weight) for v in variants],
            )
            for name, variants in self.routes.aliases().items()
        ]
        return models + aliases

    async def refresh_model_info(self) -> None:
        """Learns context windows the config left to the model (best effort)."""
        unknown = [name for name, value in self._context.items() if value is None]
        for name in unknown:
            try:
                info = await asyncio.wait_for(
                    self._handles[name].options(method_name="info").remote(), INFO_TIMEOUT_S
                )
            except Exception:  # noqa: BLE001 - metadata only: the config's value stays
                continue
            self._context[name] = info.max_model_len

    async def deployment_statuses(self) -> dict[str, str]:
        """Serve's status of every deployment of this app, by deployment name."""
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.config.app_name)
        if app is None:
            return {}
        return {name: str(d.status.value) for name, d in app.deployments.items()}
