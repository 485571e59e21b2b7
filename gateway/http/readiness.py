"""Serve's status of the gateway's deployments, as ``/ready`` reports it.

``serve.status()`` has Serve's controller build the details of the whole
instance (every application, replica, proxy and node) and the caller turn
them into models, all to read a few deployment statuses: 50 ms on an idle
2-core host, 0.3-1 s beside a busy engine, where the controller runs at low
priority. The controller's own status call for the named applications
answers the same question with a few hundred bytes of protobuf. Probes that
arrive while a question is out share its answer, so a burst of probes costs
the controller one call.

Beside a busy engine even that call can take a second (the controller runs
at the lowest priority, ``runtime.background_niceness``), longer than a
readiness probe's usual timeout: a gateway under load would be taken out of
rotation for being busy. So a probe waits for the controller at most
``WAIT_S``; past it, it is answered with the last answer, when that is at
most ``LAST_KNOWN_S`` old, and the question goes on to refresh it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

Ask = Callable[[list[str]], Awaitable[list[bytes]]]

WAIT_S = 0.25
LAST_KNOWN_S = 10.0
HEALTHY = "HEALTHY"
# A deployment changing its number of replicas (autoscaling, a new
# num_replicas) serves all the while: a gateway under a load spike is not
# taken out of rotation while a model scales up for it.
SERVING = frozenset({HEALTHY, "UPSCALING", "DOWNSCALING"})


def all_healthy(statuses: Iterable[str]) -> bool:
    """Whether every status is one of a deployment that serves (``HEALTHY``,
    or scaling): a deployment updating, unhealthy or not yet started
    (``UPDATING``, ``UNHEALTHY``, ``NOT_STARTED``...) is not ready for requests."""
    return all(status in SERVING for status in statuses)


class ServeStatuses:
    """Deployment statuses of the named Serve applications, one question in
    flight at a time per set of names."""

    def __init__(
        self,
        ask: Ask | None = None,
        wait_s: float = WAIT_S,
        last_known_s: float = LAST_KNOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ask = ask or _ask_controller()
        self._wait_s = wait_s
        self._last_known_s = last_known_s
        self._clock = clock
        self._asking: dict[tuple[str, ...], asyncio.Future[dict[str, str]]] = {}
        self._last: dict[tuple[str, ...], tuple[float, dict[str, str]]] = {}

    async def of(self, apps: Sequence[str]) -> dict[str, str]:
        """``{deployment: status}`` for every deployment of ``apps``; an
        application Serve does not know, or that lists no deployment yet,
        appears under its own name with its status (``NOT_STARTED``,
        ``DEPLOYING``...)."""
        key = tuple(sorted(set(apps)))
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = asyncio.ensure_future(self._statuses(key))
            asking.add_done_callback(lambda done: self._answered(key, done))
        # One caller giving up (a probe's timeout) leaves the question to the others.
        answer = asyncio.shield(asking)
        last = self._last.get(key)
        if last is None or self._clock() - last[0] > self._last_known_s:
            return await answer
        try:
            return await asyncio.wait_for(answer, self._wait_s)
        except Exception:  # noqa: BLE001 - slow, or Serve's controller unreachable a moment
            return last[1]

    def _answered(self, key: tuple[str, ...], done: asyncio.Future[dict[str, str]]) -> None:
        if self._asking.get(key) is done:
            del self._asking[key]
        if not done.cancelled() and done.exception() is None:
            self._last[key] = (self._clock(), done.result())

    async def _statuses(self, apps: tuple[str, ...]) -> dict[str, str]:
        return decode(await self._ask(list(apps)))


def decode(answers: list[bytes]) -> dict[str, str]:
    """Deployment statuses from the controller's ``StatusOverview`` protobufs."""
    from ray.serve._private.application_state import StatusOverview
    from ray.serve.generated.serve_pb2 import StatusOverview as StatusOverviewProto  # type: ignore[attr-defined]

    statuses: dict[str, str] = {}
    for answer in answers:
        overview = StatusOverview.from_proto(StatusOverviewProto.FromString(answer))
        if not overview.deployment_statuses:
            statuses[overview.name] = str(overview.app_status.status.value)
            continue
        statuses.update({d.name: str(d.status.value) for d in overview.deployment_statuses})
    return statuses


def _ask_controller() -> Ask:
    """Asks Serve's controller actor directly, awaiting its answer on the event
    loop (no thread); the actor handle is looked up once (Serve's controller
    is detached and restarted under the same handle)."""
    controller: list[Any] = []

    async def ask(apps: list[str]) -> list[bytes]:
        if not controller:
            import ray
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

            controller.append(
                await asyncio.to_thread(ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            )
        answers: list[bytes] = await controller[0].get_serve_statuses.remote(apps)
        return answers

    return ask
