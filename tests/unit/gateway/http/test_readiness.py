"""gateway/http/readiness.py: Serve's statuses for /ready, one question at a
time, bounded waits under load; the controller's real protobuf answers."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve._private.application_state import ApplicationStatusInfo, StatusOverview
from ray.serve._private.common import DeploymentStatus, DeploymentStatusInfo, DeploymentStatusTrigger
from ray.serve.schema import ApplicationStatus

from gateway.http.readiness import ServeStatuses, decode


def overview(app: str, status: ApplicationStatus, **deployments: DeploymentStatus) -> bytes:
    """What Serve's controller answers for one application."""
    return StatusOverview(
        name=app,
        app_status=ApplicationStatusInfo(status),
        deployment_statuses=[
            DeploymentStatusInfo(name, s, DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED)
            for name, s in deployments.items()
        ],
    ).to_proto().SerializeToString()


HEALTHY = overview("gw", ApplicationStatus.RUNNING, GatewayIngress=DeploymentStatus.HEALTHY)
DOWN = overview("gw", ApplicationStatus.DEPLOY_FAILED, GatewayIngress=DeploymentStatus.UNHEALTHY)


class Controller:
    """Answers what it is told, when it is told; counts the questions."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.asked: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, apps: list[str]) -> list[bytes]:
        self.asked.append(apps)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return list(self.answers)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_deployment_of_every_application_by_name() -> None:
    answer = decode([
        overview("gw", ApplicationStatus.RUNNING,
                 GatewayIngress=DeploymentStatus.HEALTHY, MetricsHub=DeploymentStatus.HEALTHY),
        overview("gw-chat", ApplicationStatus.DEPLOYING, **{"LLMServer:chat": DeploymentStatus.UPDATING}),
        overview("gw-gone", ApplicationStatus.NOT_STARTED),  # Serve does not know it
        overview("gw-new", ApplicationStatus.DEPLOYING),  # known, no deployment listed yet
    ])
    assert answer == {
        "GatewayIngress": "HEALTHY", "MetricsHub": "HEALTHY", "LLMServer:chat": "UPDATING",
        "gw-gone": "NOT_STARTED", "gw-new": "DEPLOYING",
    }


async def test_probes_that_arrive_together_cost_the_controller_one_question() -> None:
    controller = Controller(HEALTHY)
    controller.gate.clear()
    statuses = ServeStatuses(controller)
    probes = [asyncio.ensure_future(statuses.of(["gw", "gw-chat"])) for _ in range(20)]
    await asyncio.sleep(0)
    controller.gate.set()
    assert await asyncio.gather(*probes) == [{"GatewayIngress": "HEALTHY"}] * 20
    assert controller.asked == [["gw", "gw-chat"]]
    # The next probe asks again: answers are not kept for their own sake.
    await statuses.of(["gw-chat", "gw"])
    assert len(controller.asked) == 2


async def test_a_probe_that_gives_up_leaves_the_question_to_the_others() -> None:
    controller = Controller(HEALTHY)
    controller.gate.clear()
    statuses = ServeStatuses(controller)
    impatient = asyncio.ensure_future(statuses.of(["gw"]))
    patient = asyncio.ensure_future(statuses.of(["gw"]))
    await asyncio.sleep(0)
    impatient.cancel()
    controller.gate.set()
    assert await patient == {"GatewayIngress": "HEALTHY"}
    assert len(controller.asked) == 1


async def test_a_slow_controller_is_answered_for_by_its_last_answer_then_refreshes_it() -> None:
    clock = Clock()
    controller = Controller(HEALTHY)
    statuses = ServeStatuses(controller, wait_s=0.05, last_known_s=10.0, clock=clock)
    assert await statuses.of(["gw"]) == {"GatewayIngress": "HEALTHY"}
    controller.answers, clock.now = [DOWN], clock.now + 3
    controller.gate.clear()  # the controller is busy
    # Answered at once with the last answer (3 s old), not after the controller.
    assert await asyncio.wait_for(statuses.of(["gw"]), 1.0) == {"GatewayIngress": "HEALTHY"}
    controller.gate.set()  # the question went on: the next probe has its answer
    assert await statuses.of(["gw"]) == {"GatewayIngress": "UNHEALTHY"}
    assert len(controller.asked) == 2


async def test_without_a_recent_answer_a_probe_waits_for_the_controller() -> None:
    clock = Clock()
    controller = Controller(HEALTHY)
    statuses = ServeStatuses(controller, wait_s=0.01, last_known_s=10.0, clock=clock)
    # None yet: the first probe waits, however slow the controller is.
    controller.gate.clear()
    first = asyncio.ensure_future(statuses.of(["gw"]))
    assert not (await asyncio.wait({first}, timeout=0.05))[0]  # well past wait_s
    controller.gate.set()
    assert await first == {"GatewayIngress": "HEALTHY"}
    # One too old to stand for the gateway's state now: the same.
    controller.answers, clock.now = [DOWN], clock.now + 10.5
    controller.gate.clear()
    later = asyncio.ensure_future(statuses.of(["gw"]))
    assert not (await asyncio.wait({later}, timeout=0.05))[0]
    controller.gate.set()
    assert await later == {"GatewayIngress": "UNHEALTHY"}


async def test_a_failed_question_reaches_its_probes_and_the_next_probe_asks_again() -> None:
    controller = Controller(HEALTHY)
    controller.fail = RuntimeError("controller restarting")
    statuses = ServeStatuses(controller)
    with pytest.raises(RuntimeError, match="controller restarting"):
        await statuses.of(["gw"])
    controller.fail = None
    assert await statuses.of(["gw"]) == {"GatewayIngress": "HEALTHY"}
    assert len(controller.asked) == 2


async def test_a_controller_that_fails_a_moment_is_answered_for_by_a_recent_answer() -> None:
    clock = Clock()
    controller = Controller(HEALTHY)
    statuses = ServeStatuses(controller, wait_s=0.05, last_known_s=10.0, clock=clock)
    assert await statuses.of(["gw"]) == {"GatewayIngress": "HEALTHY"}
    controller.fail, clock.now = RuntimeError("controller restarting"), clock.now + 3
    assert await statuses.of(["gw"]) == {"GatewayIngress": "HEALTHY"}  # 3 s old: it stands
    clock.now += 8  # too old to stand for the gateway's state now
    with pytest.raises(RuntimeError, match="controller restarting"):
        await statuses.of(["gw"])


@pytest.mark.parametrize(
    ("statuses", "ready"),
    [
        (["HEALTHY", "UPSCALING"], True),  # a model autoscaling up under load serves all the while
        (["DOWNSCALING"], True),
        (["HEALTHY", "UPDATING"], False),
        (["UNHEALTHY"], False),
        (["DEPLOY_FAILED"], False),
    ],
)
def test_a_deployment_that_scales_is_ready_one_that_updates_or_fails_is_not(statuses: list[str], ready: bool) -> None:
    from gateway.http.readiness import all_healthy

    assert all_healthy(statuses) is ready
