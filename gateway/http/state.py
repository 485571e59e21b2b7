"""What one ingress replica knows: the models, the routes, the dispatcher."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from gateway.auth.keys import ApiKey, KeyTable
from gateway.auth.limiter import LimiterClient
from gateway.auth.limiter_wire import LimiterAddress
from gateway.auth.local import LocalLimiter
from gateway.config import FrontDoorConfig, GatewayConfig, LLMModelConfig, ModelConfig
from gateway.errors import GatewayError
from gateway.http.access_log import AccessLog
from gateway.http.dispatch import ModelDispatcher
from gateway.http.readiness import ServeStatuses
from gateway.http.serving import ModelClient, ServingTable, build_table
from gateway.metrics.hub import MetricsHub
from gateway.metrics.recorder import GatewayMetrics
from gateway.protocol.models import AliasVariant, ModelCard
from gateway.routing.table import Alias, RouteTable
from gateway.routing.weighted import Variant

logger = logging.getLogger(__name__)
# What the deployment statuses say while Serve's controller does not answer,
# said in the log at most once in this long.
UNAVAILABLE_KEY = "ServeController"
UNAVAILABLE_SAID_S = 60.0

INFO_TIMEOUT_S = 2.0
# A model that did not say its window in time (down, or starting) is not asked
# again for this long: every listing of /v1/models waited for it meanwhile.
INFO_RETRY_S = 10.0


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
    seed = config.routing.seed
    return RouteTable(config.served(), aliases, random.Random(seed) if seed is not None else None)


class GatewayState:
    """Bound to the FastAPI app as ``app.state.gateway`` by the ingress replica.

    ``handle_for`` gives the DeploymentHandle of a model; ``app_for`` names
    the Serve application that holds it (for readiness); ``hub`` is the
    handle of the ``MetricsHub`` the ingress replicas share, to which this
    replica reports as ``source`` and whose ledger holds the API keys' counts.
    None: the only ingress replica, which keeps both itself (``own_hub`` and
    a ledger in this process). Until ``apply`` is first called the gateway
    serves no model.
    """

    def __init__(
        self,
        front_door: FrontDoorConfig,
        handle_for: Callable[[ModelConfig], Any],
        app_for: Callable[[ModelConfig], str],
        hub: Any = None,
        source: str = "local",
    ) -> None:
        self.front_door = front_door
        self._handle_for = handle_for
        self._app_for = app_for
        self._hub = hub
        self.own_hub = MetricsHub() if hub is None else None
        self.source = source
        self.metrics = GatewayMetrics()
        self.access_log = AccessLog(front_door.ingress.access_log, replica=source)
        self.config: GatewayConfig | None = None
        self.keys = KeyTable()
        self.limiter: LimiterClient | LocalLimiter = (
            LimiterClient(self._find_limiter, front_door.ingress.replica_wait_s) if hub is not None
            else LocalLimiter()
        )
        self.dispatcher = ModelDispatcher(
            front_door.ingress.retry_after_s, metrics=self.metrics,
            limiter=self.limiter, max_body_bytes=front_door.ingress.max_body_bytes,
            read_timeout_s=front_door.ingress.read_timeout_s,
        )
        self._info_calls: dict[str, tuple[Any, Any]] = {}  # per model: its handle, and for `info`
        self._info_failed: dict[str, float] = {}  # per model: when it last did not answer `info`
        self._serve_statuses = ServeStatuses()
        self._unavailable_said = -UNAVAILABLE_SAID_S  # (when it was last said that Serve did not answer)
        self._created = int(time.time())
        self._context: dict[str, int | None] = {}

    async def _find_limiter(self) -> LimiterAddress | None:
        async with self._hub.choose_replica(_reserve=False) as selection:
            return LimiterAddress.from_metadata(selection.replica_metadata)

    @staticmethod
    def _api_keys(config: GatewayConfig) -> bool:
        return any(not k.ops for k in config.keys)

    def apply(self, models: object, routing: object, keys: object = ()) -> None:
        """Serves ``models`` with ``routing`` to the holders of ``keys`` from
        the next request on.

        Raises ConfigError (keeping the current table) when they do not
        validate together.
        """
        self._commit(*self._prepared(models, routing, keys))

    async def apply_warmed(self, models: object, routing: object, keys: object, timeout_s: float) -> None:
        """As ``apply``, but the clients of models new to this replica first
        look up a running replica (waiting at most ``timeout_s``), as
        ``warm_up`` does at start: the first requests to a variant added live
        would otherwise wait on Serve's router learning of it (0.4-0.9 s here,
        once past a 2 s ``replica_wait_s``: a 503 beside a running model).
        Requests meanwhile are served by the current table."""
        config, table, reshaped = self._prepared(models, routing, keys)
        known = {served.client for served in self.dispatcher.table.models.values()}
        new = [c for c in dict.fromkeys(served.client for served in table.models.values()) if c not in known]
        if new:
            await asyncio.wait([asyncio.ensure_future(_warm(client)) for client in new], timeout=timeout_s)
        self._commit(config, table, reshaped)

    def _prepared(self, models: object, routing: object, keys: object) -> tuple[GatewayConfig, ServingTable, set[str]]:
        """The validated config, its table, and the models learnt again (see ``apply``)."""
        config = GatewayConfig.assemble(self.front_door, models, routing, keys)
        if not self._api_keys(config) and (self.config is None or self._api_keys(self.config)):
            logger.warning(
                "no API keys configured: whoever reaches the gateway may use every model"
            )
        served = self.dispatcher.table.models
        before = {m.name: m for m in self.config.models} if self.config is not None else {}
        handles: dict[str, Any] = {}
        for model in config.models:
            old = served.get(model.name)
            # Same model name and kind: same deployment, so the handle (and its client) stays.
            # (A name that was an adapter's reached its base model's deployment.)
            keep = old is not None and model.name in before and old.kind == model.kind
            handles[model.name] = old.client.source if keep and old is not None else self._handle_for(model)
        # A model whose replicas change shape (other weights, another window) is
        # learnt again: its tokenizer, window and context are those of the old ones.
        reshaped = {
            m.name for m in config.models if m.name in before and before[m.name].deployment_args() != m.deployment_args()
        }
        ingress = self.front_door.ingress
        table = build_table(
            config, _route_table(config), handles, self.dispatcher.table, ingress.replica_wait_s,
            ingress.stream_handoff, relearn=reshaped,
        )
        return config, table, reshaped

    def _commit(self, config: GatewayConfig, table: ServingTable, reshaped: set[str]) -> None:
        self.config = config
        self.keys = KeyTable(config.keys)
        self._context = {
            m.name: (m.max_model_len if isinstance(m, LLMModelConfig) else None)
            or (None if m.name in reshaped else self._context.get(m.name))
            for m in config.models
        }
        # A model restarted (or gone) is asked afresh.
        self._info_failed = {n: t for n, t in self._info_failed.items() if n in self._context and n not in reshaped}
        self.dispatcher.serve(table)
        logger.info(
            "serving %d models, %d routes, %d API keys",
            len(config.models), len(config.routing.routes), len(config.keys),
        )

    async def warm_up(self, timeout_s: float) -> None:
        """Finds a running replica of every model served, at once, waiting
        at most ``timeout_s``: a new ingress replica does this before it takes
        clients: the first look-up of a model (Serve's router asking its
        controller for the first time) took 0.4-0.9 s here with the CPU busy,
        and over the test gateway's 2 s ``replica_wait_s`` once in the test
        suite, where the requests that waited for it were answered 503 ("no
        replica running") beside a running model. The keys' ledger is reached
        too, where the replicas share one. A model that is down is looked for
        on in the background, as a request would."""
        # Once per client: a model's LoRA adapters share it.
        clients = dict.fromkeys(served.client for served in self.dispatcher.table.models.values())
        parts: list[ModelClient | LimiterClient] = list(clients)
        if isinstance(self.limiter, LimiterClient) and self.config is not None and self.config.keys:
            parts.append(self.limiter)  # the keys' ledger, in the hub shared by the ingress replicas
        if parts:
            await asyncio.wait([asyncio.ensure_future(_warm(part)) for part in parts], timeout=timeout_s)

    async def metrics_page(self) -> str:
        """The whole gateway's metrics, the LLM replicas' engine pages included."""
        version = self.metrics.version
        if self.own_hub is not None:
            return await self.own_hub.render(self.source, self.metrics.snapshot(), version)
        try:
            page: str = await self._hub.render.remote(self.source, self.metrics.snapshot(), version)
        except TypeError:  # a hub of a version before ``version``, until it rolls over too
            page = await self._hub.render.remote(self.source, self.metrics.snapshot())
        return page

    # An LLM replica's calls for its engine page (``gateway.metrics.engine_pages``),
    # kept here or passed to the shared hub.

    async def engine_asked(self, source: str, answered: int) -> int:
        if self.own_hub is not None:
            return await self.own_hub.engine_asked(source, answered)
        asked: int = await self._hub.engine_asked.remote(source, answered)
        return asked

    async def report_engine(self, source: str, text: str, answers: int) -> None:
        if self.own_hub is not None:
            await self.own_hub.report_engine(source, text, answers)
        else:
            await self._hub.report_engine.remote(source, text, answers)

    async def engine_gone(self, source: str) -> None:
        if self.own_hub is not None:
            await self.own_hub.engine_gone(source)
        else:
            await self._hub.engine_gone.remote(source)

    @property
    def routes(self) -> RouteTable:
        """The table requests are routed with now."""
        return self.dispatcher.routes

    def model_cards(self, key: ApiKey | None = None) -> list[ModelCard]:
        """Concrete models, then aliases with their variants and weights: those
        ``key`` may use (all without a key)."""
        cards = self._model_cards()
        return cards if key is None else [card for card in cards if key.allows(card.id)]

    def _model_cards(self) -> list[ModelCard]:
        if self.config is None:
            return []
        models = [
            ModelCard(
                id=m.name,
                created=self._created,
                root=m.model,
                max_model_len=self._context.get(m.name) if m.kind == "llm" else None,
                kind=m.kind,
            )
            for m in self.config.models
        ]
        adapters = [
            ModelCard(
                id=name,
                created=self._created,
                root=getattr(base, "lora_adapters", {})[name],
                parent=base.name,
                max_model_len=self._context.get(base.name),
                kind=base.kind,
            )
            for name, base in self.config.adapters().items()
        ]
        served = self.config.served()
        aliases = [
            ModelCard(
                id=name,
                created=self._created,
                max_model_len=self._shared_window([served[v.name].name for v in variants]),
                kind=served[variants[0].name].kind,
                variants=[AliasVariant(id=v.name, weight=v.weight) for v in variants],
            )
            for name, variants in self.routes.aliases().items()
        ]
        return models + adapters + aliases

    def _shared_window(self, models: list[str]) -> int | None:
        """The context window every one of ``models`` has (an alias's, whose
        requests may reach any): the smallest, once all are known."""
        windows = [self._context.get(name) for name in models]
        return None if not windows or None in windows else min(w for w in windows if w is not None)

    async def refresh_model_info(self) -> None:
        """Learns context windows the config left to the model (best effort),
        asking every such model at once: a model with no running replica
        holds a listing for one wait, not one wait each."""
        models = self.dispatcher.table.models
        now = time.monotonic()
        unknown = [
            name for name, value in self._context.items()
            if value is None and name in models and models[name].kind == "llm"
            and now - self._info_failed.get(name, -INFO_RETRY_S) >= INFO_RETRY_S
        ]
        await asyncio.gather(*(self._learn_info(name, models[name].client.source) for name in unknown))

    async def _learn_info(self, name: str, handle: Any) -> None:
        ask = self._info_calls.get(name)
        if ask is None or ask[0] is not handle:  # ``options`` makes a new handle: once per model
            ask = self._info_calls[name] = (handle, handle.options(method_name="info"))
        try:
            info = await asyncio.wait_for(ask[1].remote(), INFO_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - metadata only: the config's value stays
            self._info_failed[name] = time.monotonic()
            return
        self._info_failed.pop(name, None)
        self._context[name] = info.max_model_len

    async def deployment_statuses(self) -> dict[str, str]:
        """Serve's status of the ingress and every model deployment, by
        deployment name; ``{"ServeController": "UNAVAILABLE"}`` while Serve's
        controller does not answer (restarting): not ready, said so, where
        the probe was answered 500 as a failure of the gateway's own."""
        models = self.config.models if self.config is not None else []
        apps = {self.front_door.app_name} | {self._app_for(m) for m in models}
        try:
            return await self._serve_statuses.of(sorted(apps))
        except Exception as exc:  # noqa: BLE001 - Ray's errors reaching the controller
            now = time.monotonic()
            if now - self._unavailable_said > UNAVAILABLE_SAID_S:
                self._unavailable_said = now
                logger.warning("Serve's deployment statuses could not be read (not ready until they are): %r", exc)
            return {UNAVAILABLE_KEY: "UNAVAILABLE"}


async def _warm(part: ModelClient | LimiterClient) -> None:
    try:
        await part.warm()
    except GatewayError:
        pass  # a model (or the ledger) that is down: its requests find out, as this one did
    except Exception as exc:  # noqa: BLE001 - Serve's router failing: the requests find out too
        logger.info("could not look up a model's replicas (or the keys' ledger) before taking clients: %s", exc)
