"""gateway/http/ingress.py: a stopping ingress replica ends before Serve kills it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.config import FrontDoorConfig
from gateway.http import ingress
from gateway.http.ingress import GatewayIngress


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, float | None]] = []

    async def stop(self, grace_s: float | None = None) -> None:
        self.events.append(("stop", grace_s))

    def flush(self) -> None:
        self.events.append(("flush", None))


@pytest.mark.parametrize(("grace", "front_door_grace"), [(60.0, 57.0), (4.5, 1.5), (2.0, 1.0)])
async def test_the_front_door_stops_within_serves_grace_and_the_access_log_is_written(
    grace: float, front_door_grace: float
) -> None:
    # Serve kills the replica once ``graceful_shutdown_s`` has passed since it
    # asked it to stop, after its own 2 s drain loop: the front door given the
    # whole grace was killed mid-stop and buffered access-log lines were lost.
    recorder = Recorder()
    config = FrontDoorConfig.model_validate({"ingress": {"graceful_shutdown_s": grace}})
    state = SimpleNamespace(front_door=config, access_log=recorder)
    # (The replica's own attributes, without Serve's wrapper class around it.)
    await GatewayIngress.stop(SimpleNamespace(_front_door=recorder, _reporter=recorder, _state=state))
    assert recorder.events == [("stop", front_door_grace), ("stop", None), ("flush", None)]
    assert grace - front_door_grace >= min(ingress.STOP_MARGIN_S, grace - 1.0)
