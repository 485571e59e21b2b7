"""The ingress deployment: FastAPI under @serve.ingress, CPU only.

It never imports vllm or torch; model replicas are reached only through
DeploymentHandles: the ones it is bound to (single-application form) or, when
each model runs as its own application, handles it looks up by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from ray import serve

from gateway.config import FrontDoorConfig, ModelConfig
from gateway.deploy import deployment_name, model_app_name
from gateway.heap_freeze import freeze_in_replica
from gateway.http.api import build_api
from gateway.http.front_door import FrontDoor, own_front_door
from gateway.http.state import GatewayState
from gateway.metrics.hub import MetricsReporter, replica_source
from gateway.replica_logs import to_stderr

# The longest a new ingress replica waits for its models' replicas to be known before it takes clients.
WARM_UP_S = 10.0
# Serve's drain loop runs before ``__del__``: it checks this often (Serve's
# default, 2 s) until no handle call is open on the replica. Model replicas
# keep one open on an ingress (their metrics pages' long poll, ``HOLD_S``):
# one routed before their routers learnt of the stop held the stop back a
# second loop, 4 s in all, past what the margin below allows.
DRAIN_CHECK_S = 0.5
# Of ``ingress.graceful_shutdown_s``: Serve's controller kills the replica
# when the grace is over, counted from before that loop (at most ``HOLD_S``
# and one check long). The front door's requests are cut this much sooner,
# so that the stop ends (buffered access-log lines written) first.
STOP_MARGIN_S = 3.0


@serve.ingress()
class GatewayIngress:
    def __init__(
        self, front_door: FrontDoorConfig, handles: Mapping[str, Any] | None, hub: Any
    ) -> None:
        # Serve calls a replica's ``__del__`` on a graceful stop and awaits it. It is
        # set on the instance: the garbage collector looks for ``__del__`` on the
        # class only, so it never makes a coroutine that no one awaits.
        self.__del__ = self.stop
        to_stderr()
        self._bound = dict(handles) if handles is not None else None
        self._front_door: FrontDoor | None = None
        self._front_door_checked = False
        self._app = front_door.app_name
        source = replica_source()
        state = self._state = GatewayState(
            front_door, self._handle_for, self._app_for, hub=hub, source=source
        )
        self._reporter = MetricsReporter(
            send=(lambda taken: hub.report.remote(source, taken[1], taken[0])) if hub is not None else None,
            collect=lambda: (state.metrics.version, state.metrics.snapshot()),
            changed=lambda: state.metrics.version,
            after_each=state.access_log.flush,
        )

    def _handle_for(self, model: ModelConfig) -> Any:
        if self._bound is not None:
            return self._bound[model.name]
        # Not checked against the controller: deploy starts a model's
        # application before the ingress learns of it.
        return serve.get_deployment_handle(
            deployment_name(model), model_app_name(self._app, model.name), _check_exists=False
        )

    def _app_for(self, model: ModelConfig) -> str:
        if self._bound is not None:
            return serve.get_replica_context().app_name
        return model_app_name(self._app, model.name)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the models, routes and keys, at start and on every redeploy.

        Async so that it runs on the replica's event loop, where the handles it
        makes will route. Changes apply to requests that arrive afterwards; requests in flight
        keep the variant they were given. The replica is not restarted.
        """
        models, routing, keys = user_config["models"], user_config["routing"], user_config.get("keys", [])
        wait_s = min(self._state.front_door.ingress.replica_wait_s, WARM_UP_S)
        if self._front_door is not None:
            # A redeploy: models it adds are looked up before they are routed to. Only where this
            # replica takes its clients itself: behind HAProxy or Serve's proxy, Serve routes
            # nothing to a replica until its reconfigure returns, and the wait would refuse them all.
            await self._state.apply_warmed(models, routing, keys, wait_s)
        else:
            self._state.apply(models, routing, keys)
        self._reporter.start()
        if not self._front_door_checked:
            self._front_door_checked = True
            # Clients (from its own front door or Serve's) once its models' replicas are known.
            await self._state.warm_up(wait_s)
            if (address := await own_front_door(serve.get_replica_context().app_name)) is not None:
                ingress = self._state.front_door.ingress
                self._front_door = FrontDoor(
                    build_api(self._state),
                    *address,
                    read_timeout_s=ingress.read_timeout_s,
                    max_ongoing_requests=ingress.max_ongoing_requests,
                )
                await self._front_door.start()
        freeze_in_replica()  # once, see gateway.heap_freeze: its app is built by now

    # The LLM replicas' calls for their engine pages (``gateway.metrics.engine_pages``).

    async def engine_asked(self, source: str, answered: int) -> int:
        return await self._state.engine_asked(source, answered)

    async def report_engine(self, source: str, text: str, answers: int) -> None:
        await self._state.report_engine(source, text, answers)

    async def engine_gone(self, source: str) -> None:
        await self._state.engine_gone(source)

    async def stop(self) -> None:
        """A graceful stop (Serve's ``__del__``): with its own front door it
        takes no more connections and lets requests in flight finish (Serve
        does not see them), then lines still buffered go out. Those still
        running shortly before its grace is over are stopped with an error
        (``gateway.http.deadlines``), not cut off."""
        if self._front_door is not None:
            grace = max(1.0, self._state.front_door.ingress.graceful_shutdown_s - STOP_MARGIN_S)
            self._state.dispatcher.stopping.begin(grace)
            await self._front_door.stop(grace)
        self._state.access_log.flush()  # (the last report may wait on a hub being removed too)
        await self._reporter.stop()
        self._state.access_log.flush()

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built in the replica, after __init__, so the app holds this replica's state.
        # Serve's own middleware echoes x-request-id on every response.
        return build_api(self._state, server_echoes_id=True)
