"""gateway/deploy.py: one Serve application per model, applied in three steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config
from gateway.deploy import ADDED, LIVE, REMOVED, REPLACED, deploy, ingress_user_config, serve_config

BASE = {
    "app_name": "gw",
    "models": [
        {"name": "a", "engine": "echo"},
        {"name": "e", "engine": "sentence-transformers", "model": "org/e", "max_batch_size": 8},
    ],
    "routing": {"routes": [{"name": "r", "variants": {"a": 1}}]},
}


def apps(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {app["name"]: app for app in serve_config(parse_config(config))["applications"]}


def test_each_model_is_an_application_of_its_own_without_http_route() -> None:
    built = apps(BASE)
    assert list(built) == ["gw:a", "gw:e", "gw"]
    assert built["gw:a"]["route_prefix"] is None
    assert built["gw:e"]["deployments"] == [
        {"name": "ClassicalServer:e", "num_replicas": 1, "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005}}
    ]
    ingress = built["gw"]["deployments"][0]
    assert [m["name"] for m in ingress["user_config"]["models"]] == ["a", "e"]
    assert ingress["user_config"]["routing"]["routes"][0]["variants"] == {"a": 1.0}


def test_live_changes_leave_every_applications_arguments_alone() -> None:
    changed = {
        **BASE,
        "models": [{**BASE["models"][0], "num_replicas": 2}, {**BASE["models"][1], "max_batch_size": 1}],
        "routing": {"routes": [{"name": "r", "variants": {"a": 3}}]},
    }
    before, after = apps(BASE), apps(changed)
    assert {n: a["args"] for n, a in before.items()} == {n: a["args"] for n, a in after.items()}
    assert before["gw:e"]["deployments"] != after["gw:e"]["deployments"]


def test_adding_a_model_changes_no_other_application() -> None:
    added = {**BASE, "models": [*BASE["models"], {"name": "b", "engine": "echo"}]}
    before, after = apps(BASE), apps(added)
    assert set(after) - set(before) == {"gw:b"}
    assert all(before[name]["args"] == after[name]["args"] for name in before)


class FakeClient:
    """Records what each deploy step asked Serve for."""

    def __init__(self, deployed: dict[str, dict[str, Any]], proxy_location: str = "EveryNode") -> None:
        self.deployed = deployed
        self.proxy_location = proxy_location
        self.steps: list[tuple[list[str], str]] = []
        self.applied: list[dict[str, dict[str, Any]]] = []  # every step's applications

    def get_serve_details(self) -> dict[str, Any]:
        return {
            "proxy_location": self.proxy_location,
            "applications": {n: {"deployed_app_config": a} for n, a in self.deployed.items()},
        }

    def deploy_apps(self, schema: Any) -> None:
        applications = schema.model_dump(exclude_unset=True)["applications"]
        self.deployed = {app["name"]: app for app in applications}
        self.applied.append(self.deployed)
        ingress = self.deployed.get("gw", {}).get("deployments", [{}])[0].get("user_config", {})
        self.steps.append((sorted(self.deployed), ",".join(m["name"] for m in ingress.get("models", []))))

    def _wait_for_application_running(self, name: str, timeout_s: int) -> None:
        assert name in self.deployed


def test_deploy_starts_new_models_before_routing_to_them_and_removes_old_ones_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = {"name": "someone-else", "import_path": "x:y", "route_prefix": "/other"}
    client = FakeClient({**apps(BASE), "someone-else": other})
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 1.0}})
    swapped = {**BASE, "models": [BASE["models"][0], {"name": "b", "engine": "echo"}], "routing": {}}
    assert deploy(parse_config(swapped)) == {"b": ADDED, "e": REMOVED}
    assert client.steps == [
        (["gw", "gw:a", "gw:b", "gw:e", "someone-else"], "a,e"),  # b starts; ingress unchanged
        (["gw", "gw:a", "gw:b", "gw:e", "someone-else"], "a,b"),  # ingress routes to b, not e
        (["gw", "gw:a", "gw:b", "someone-else"], "a,b"),  # e goes; other apps stay
    ]


def test_deploy_fails_before_submitting_anything_when_a_replica_fits_no_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeClient({})
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    big = {**BASE, "models": [{"name": "a", "engine": "echo", "tensor_parallel_size": 4, "gpus_per_worker": 0}]}
    with pytest.raises(ConfigError, match=r"models\[a\]: a replica needs bundles"):
        deploy(parse_config({**big, "routing": {}}))
    assert client.steps == []


def test_a_route_prefix_the_gateways_own_front_door_cannot_serve_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeClient(apps(BASE), proxy_location="Disabled")
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    with pytest.raises(ConfigError, match=r"route_prefix '/api': this gateway's own front door serves only `/`"):
        deploy(parse_config({**BASE, "route_prefix": "/api"}))
    assert client.steps == []


def test_a_changed_app_name_on_the_running_gateways_prefix_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    with pytest.raises(ConfigError, match=r"route_prefix '/' is application 'gw''s: a changed `app_name`"):
        deploy(parse_config({**BASE, "app_name": "gw2"}))
    assert client.steps == []


def test_adding_a_model_with_no_room_free_says_so_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Else deploy waits up to its timeout (15 minutes) in silence.
    client = FakeClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])  # (room in all)
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 0.1}})
    added = {**BASE, "models": [*BASE["models"], {"name": "b", "engine": "echo"}]}
    with caplog.at_level("WARNING", logger="gateway.deploy"):
        assert deploy(parse_config(added)) == {"b": ADDED}
    assert "no room free now for the replicas of b" in caplog.text
    caplog.clear()
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 1.0}})
    with caplog.at_level("WARNING", logger="gateway.deploy"):
        deploy(parse_config({**added, "models": [*added["models"], {"name": "c", "engine": "echo"}]}))
    assert "no room" not in caplog.text


def test_behind_serves_proxies_an_application_may_move_to_a_prefix_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    deploy(parse_config({**BASE, "route_prefix": "/api"}))
    assert client.deployed["gw"]["route_prefix"] == "/api"


def test_deploy_swaps_in_one_step_when_the_new_models_need_the_room_of_the_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])  # (room in all)
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 0.1}})
    swapped = {**BASE, "models": [BASE["models"][0], {"name": "b", "engine": "echo"}], "routing": {}}
    deploy(parse_config(swapped))
    # b (0.5 CPU) cannot start beside e: e goes as b comes, in a single step.
    assert client.steps == [(["gw", "gw:a", "gw:b"], "a,b")]


def test_an_adapter_leaves_running_replicas_only_once_the_ingress_no_longer_routes_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def with_adapters(**adapters: str) -> dict[str, Any]:
        model = {"name": "v", "engine": "vllm", "model": "org/model", "lora_adapters": adapters}
        return {"app_name": "gw", "models": [model], "routing": {}}

    def adapters_of(step: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
        replicas = step["gw:v"]["deployments"][0]["user_config"]["lora_adapters"]
        routed = step["gw"]["deployments"][0]["user_config"]["models"][0]["lora_adapters"]
        return sorted(replicas), sorted(routed)

    client = FakeClient(apps(with_adapters(old="org/old", kept="org/kept")))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert deploy(parse_config(with_adapters(kept="org/kept-v2", new="org/new"))) == {"v": LIVE}
    assert [adapters_of(step) for step in client.applied] == [
        (["kept", "new", "old"], ["kept", "old"]),  # the replicas load new, keep old: the ingress routes to it
        (["kept", "new", "old"], ["kept", "new"]),  # the ingress routes with the new table
        (["kept", "new"], ["kept", "new"]),  # only then is old unloaded
    ]
    assert client.applied[0]["gw:v"]["deployments"][0]["user_config"]["lora_adapters"]["kept"] == "org/kept-v2"
    assert len({str(step["gw:v"]["args"]) for step in client.applied}) == 1  # no replica restarted


def test_replicas_that_restart_start_with_only_the_new_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    model = {"name": "v", "engine": "vllm", "model": "org/model", "lora_adapters": {"old": "org/old"}}
    client = FakeClient(apps({"app_name": "gw", "models": [model], "routing": {}}))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    restarted = {**model, "lora_adapters": {"new": "org/new"}, "engine_args": {"max-lora-rank": 64}}
    assert deploy(parse_config({"app_name": "gw", "models": [restarted], "routing": {}})) == {"v": REPLACED}
    # A new replica's rank limit need not fit the adapter leaving: it never loads it.
    started_with = {tuple(step["gw:v"]["deployments"][0]["user_config"]["lora_adapters"]) for step in client.applied}
    assert started_with == {("new",)}


def test_a_deploy_that_changes_nothing_says_nothing_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert deploy(parse_config(BASE)) == {}
    scaled = {**BASE, "models": [{**BASE["models"][0], "num_replicas": 2}, BASE["models"][1]]}
    assert deploy(parse_config(scaled)) == {"a": LIVE}
    autoscaled = {**BASE, "models": [{**BASE["models"][0], "autoscaling": {"min_replicas": 1, "max_replicas": 2}},
                                     BASE["models"][1]]}
    # Serve counts the autoscaling policy in the code version: the switch replaces the replicas.
    assert deploy(parse_config(autoscaled)) == {"a": REPLACED}
    assert deploy(parse_config(autoscaled)) == {}  # (its ingress copy lacks num_replicas: still the same)
    wider = {**BASE, "models": [{**BASE["models"][0], "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
                                BASE["models"][1]]}
    assert deploy(parse_config(wider)) == {"a": LIVE}
    assert deploy(parse_config(scaled)) == {"a": REPLACED}


def test_a_running_model_is_not_set_back_to_its_initial_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve sets the count to initial_replicas again at any change of the deployment's config:
    # a model scaled up under load dropped to it when its batch size changed.
    scaling = {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2}
    first = {**BASE, "models": [BASE["models"][0], {**BASE["models"][1], "autoscaling": scaling}]}
    client = FakeClient(apps({**BASE, "models": [BASE["models"][0]]}))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 4.0}})
    assert deploy(parse_config(first)) == {"e": ADDED}

    def initial() -> set[int | None]:
        return {step["gw:e"]["deployments"][0]["autoscaling_config"]["initial_replicas"] for step in client.applied}

    assert initial() == {2}  # a new model starts with them
    client.applied.clear()
    batched = {**first, "models": [BASE["models"][0], {**first["models"][1], "max_batch_size": 4}]}
    assert deploy(parse_config(batched)) == {"e": LIVE}
    assert initial() == {None}


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[3].glob("configs/**/*.yaml")), ids=lambda p: p.name)
def test_the_ingress_reads_back_every_shipped_configs_models_and_routes(path: Path) -> None:
    # The ingress validates its user_config again; a model with autoscaling failed there, so it never started.
    config = load_config(path)
    user_config = ingress_user_config(config)
    models, routing, keys = user_config["models"], user_config["routing"], user_config["keys"]
    again = GatewayConfig.assemble(config.front_door(), models, routing, keys)
    assert again.models == config.models
    assert again.routing == config.routing


def test_a_model_scaled_by_load_reaches_the_ingress_with_its_autoscaling() -> None:
    model = {"name": "e", "engine": "sentence-transformers", "model": "org/e",
             "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    config = parse_config({"models": [model]})
    user_config = ingress_user_config(config)
    again = GatewayConfig.assemble(config.front_door(), user_config["models"], user_config["routing"])
    assert again.models[0].autoscaling == config.models[0].autoscaling
    assert again.models[0].max_replicas == 3


def test_the_stops_grace_is_the_longest_running_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # A `deploy` after the start lengthened a model's grace: the stop gave up (and cut its streams) at the old one.
    from gateway.deploy import grace_s

    config = parse_config(BASE)
    client = FakeClient(apps(BASE))
    details = client.get_serve_details()
    running = {"deployments": {"LLMServer:a": {"deployment_config": {"graceful_shutdown_timeout_s": 600.0}}}}
    details["applications"]["gw:a"].update(running)
    details["applications"]["other"] = {"deployed_app_config": {"name": "other"}, **running}
    client.get_serve_details = lambda: details  # type: ignore[method-assign]
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    assert grace_s(config) == 600
    del details["applications"]["gw:a"]["deployments"]
    assert grace_s(config) == max(config.ingress.graceful_shutdown_s, *(m.graceful_shutdown_s for m in config.models))


# What Serve keeps as a deployment's message when its replicas fail to start (Ray 2.60), cut short: the
# replica's traceback, whose last exception is vLLM's own words.
SERVE_FAILURE = """The deployment failed to start 3 times in a row. This may be due to a problem with its constructor \
or initial health check failing. See controller logs for details. Error:
ray::ServeReplica:gw:b:EchoServer:b.initialize_and_get_metadata() (pid=22541, ip=127.0.0.1)
  File "/app/.venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1928, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "/app/.venv/lib/python3.11/site-packages/vllm/parser/parser_manager.py", line 87, in validate_parser_tokenizer
    parser_cls(tokenizer)
RuntimeError: Llama3JsonToolParser could not locate the bot token '<|python_tag|>' in the tokenizer.

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/app/.venv/lib/python3.11/site-packages/vllm/parser/parser_manager.py", line 94, in validate_parser_tokenizer
    raise TypeError(
TypeError: --tool-call-parser llama3_json cannot be used with the tokenizer of 'm': Llama3JsonToolParser could not \
locate the bot token '<|python_tag|>' in the tokenizer.
"""


class FailingClient(FakeClient):
    """Serve, where a new model's replicas fail to start."""

    def _wait_for_application_running(self, name: str, timeout_s: int) -> None:
        if name == "gw:b":
            raise RuntimeError(f"Deploying application {name} failed: Failed to update the deployments ['EchoServer:b'].")

    def get_serve_details(self) -> dict[str, Any]:
        details = super().get_serve_details()
        if "gw:b" in details["applications"]:
            details["applications"]["gw:b"]["deployments"] = {
                "EchoServer:b": {"status": "DEPLOY_FAILED", "message": SERVE_FAILURE},
            }
            details["applications"]["gw:a"]["deployments"] = {"EchoServer:a": {"status": "HEALTHY", "message": ""}}
        return details


def test_a_model_that_fails_to_start_is_reported_with_its_replicas_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve's own words were all `llm-gateway serve` said: "Failed to update the deployments ['LLMServer:llama']".
    from gateway.deploy import DeployFailed

    client = FailingClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 1.0}})
    added = {**BASE, "models": [*BASE["models"], {"name": "b", "engine": "echo"}]}
    with pytest.raises(DeployFailed) as failed:
        deploy(parse_config(added))
    assert str(failed.value).splitlines() == [
        "Deploying application gw:b failed: Failed to update the deployments ['EchoServer:b'].",
        "  EchoServer:b: TypeError: --tool-call-parser llama3_json cannot be used with the tokenizer of 'm': "
        "Llama3JsonToolParser could not locate the bot token '<|python_tag|>' in the tokenizer.",
    ]


def test_a_failure_without_a_traceback_is_said_by_its_last_line() -> None:
    from gateway.deploy import root_cause

    assert root_cause("Replica scheduling failed.\nNo node fits {'GPU': 2}.\n") == "No node fits {'GPU': 2}."
    assert root_cause("KeyError: 'x'") == "KeyError: 'x'"


def test_an_exceptions_message_of_several_lines_is_said_whole_and_what_follows_it_is_not() -> None:
    # vLLM's config errors are pydantic's: the reason is on the lines after the exception's own.
    from gateway.deploy import root_cause

    message = SERVE_FAILURE.replace(
        "TypeError: --tool-call-parser llama3_json cannot be used with the tokenizer of 'm': Llama3JsonToolParser could "
        "not locate the bot token '<|python_tag|>' in the tokenizer.",
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
        "  Value error, User-specified max_model_len (99999) is greater than the derived max_model_len (2048).\n"
        "    For further information visit https://errors.pydantic.dev/2.11/v/value_error\n\n"
        "(the replica's own log line)",
    )
    assert root_cause(message) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
        "    Value error, User-specified max_model_len (99999) is greater than the derived max_model_len (2048).\n"
        "    For further information visit https://errors.pydantic.dev/2.11/v/value_error"
    )


def test_a_model_still_not_running_at_the_deadline_says_what_serve_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    class WaitingClient(FailingClient):
        def _wait_for_application_running(self, name: str, timeout_s: int) -> None:
            if name == "gw:b":
                raise TimeoutError(f"Application {name} did not become RUNNING after {timeout_s}s.")

        def get_serve_details(self) -> dict[str, Any]:
            details = super().get_serve_details()
            if "gw:b" in details["applications"]:
                waiting = "Deployment 'EchoServer:b' in application 'gw:b' has 1 replicas that have taken more than 30s"
                details["applications"]["gw:b"]["deployments"]["EchoServer:b"] = {"status": "UPDATING", "message": waiting}
            return details

    client = WaitingClient(apps(BASE))
    monkeypatch.setattr("ray.serve._private.api.serve_start", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr("ray._private.state.available_resources_per_node", lambda: {"n": {"CPU": 1.0}})
    added = {**BASE, "models": [*BASE["models"], {"name": "b", "engine": "echo"}]}
    with pytest.raises(TimeoutError) as waited:
        deploy(parse_config(added), timeout_s=5)
    assert str(waited.value).splitlines()[1] == (
        "  EchoServer:b: Deployment 'EchoServer:b' in application 'gw:b' has 1 replicas that have taken more than 30s"
    )
