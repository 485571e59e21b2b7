"""gateway/config/: a config is valid once, or start-up fails naming field and reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config


def _config(**model: Any) -> dict[str, Any]:
    return {"models": [{"name": "echo", "engine": "echo", **model}]}


def test_minimal_config_parses_with_defaults() -> None:
    config = parse_config({"models": [{"name": "echo", "engine": "echo"}]})

    assert isinstance(config, GatewayConfig)
    assert config.app_name == "llm-gateway"
    assert config.route_prefix == "/"
    assert config.ingress.num_replicas == 1
    assert [m.name for m in config.models] == ["echo"]
    assert config.model("echo").engine == "echo"
    assert config.model("echo").model is None


def test_model_lookup_of_unknown_name_raises_key_error() -> None:
    config = parse_config(_config())

    with pytest.raises(KeyError):
        config.model("missing")


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        pytest.param(
            _config(colour="blue"), "models.0.colour", "`colour` is not a model setting", id="unknown-model-field"
        ),
        pytest.param(
            {**_config(), "debug": True}, "debug", "Extra inputs are not permitted", id="unknown-top-level-field"
        ),
        pytest.param(_config(num_cpus=-1), "models.0.num_cpus", "greater than 0", id="negative-num-cpus"),
        pytest.param(
            {"models": [{"name": "a", "engine": "echo"}, {"name": "a", "engine": "echo"}]},
            "models",
            "duplicate model name 'a'",
            id="duplicate-names",
        ),
        pytest.param(
            {"models": [{"name": "llm", "engine": "vllm"}]},
            "models.0",
            "`model` is required when engine is `vllm`",
            id="vllm-without-model",
        ),
        pytest.param({"models": []}, "models", "at least 1 item", id="empty-models"),
        pytest.param({}, "models", "Field required", id="missing-models"),
        pytest.param(
            _config(engine="tgi"), "models.0.engine", "one of vllm, echo, sklearn, sentence-transformers", id="unknown-engine"
        ),
        pytest.param(_config(name="bad name"), "models.0.name", "should match pattern", id="bad-model-name"),
        pytest.param(
            {"models": [{"name": "e", "engine": "sentence-transformers", "model": "org/minilm", "dtype": "fp8"}]},
            "models.0.dtype",
            "dtype 'fp8' is not one of auto, float32, bfloat16, float16",
            id="unknown-embedding-dtype",
        ),
        pytest.param(
            {"models": [{"name": "c", "engine": "sklearn", "model": "models:/iris/1", "dtype": "float32"}]},
            "models.0.dtype",
            "`dtype` is not a setting of sklearn models; only vllm and sentence-transformers models have it",
            id="sklearn-dtype",
        ),
        pytest.param(
            _config(json_whitespace="compact"),
            "models.0.json_whitespace",
            "`json_whitespace` is not a setting of echo models; only vllm models have it",
            id="json-whitespace-on-echo",
        ),
        pytest.param(
            {"models": [{"name": "m", "model": "org/m", "json_whitespace": "any",
                         "engine_args": {"structured-outputs-config": '{"backend": "guidance"}'}}]},
            "models.0",
            "set either `json_whitespace` or `engine_args.structured-outputs-config`, not both",
            id="json-whitespace-twice",
        ),
        pytest.param(
            {"models": [{"name": "m", "model": "org/m", "json_whitespace": "compact",
                         "engine_args": {"structured_outputs_config.backend": "guidance"}}]},
            "models.0",
            "set either `json_whitespace` or `engine_args.structured-outputs-config`, not both",
            id="json-whitespace-and-a-field",
        ),
        # Other names vLLM's parser takes for what the gateway sets: the engine ran otherwise.
        pytest.param(
            {"models": [{"name": "m", "model": "org/m", "engine_args": {"device-memory-utilization": 0.9}}]},
            "models.0",
            "`engine_args.device-memory-utilization` is the gateway's to set: use the model's `gpu_memory_utilization`",
            id="gpu-memory-alias",
        ),
        pytest.param(
            {"models": [{"name": "m", "model": "org/m", "engine_args": {"no-enable-auto-tool-choice": True}}]},
            "models.0",
            "`engine_args.no-enable-auto-tool-choice` is the gateway's to set: use the model's `tool_call_parser`",
            id="auto-tool-choice-off",
        ),
        pytest.param(
            {"models": [{"name": "m", "model": "org/m", "json_whitespace": "tabs"}]},
            "models.0.json_whitespace",
            "'compact' or 'any'",
            id="json-whitespace-unknown",
        ),
        pytest.param(
            _config(max_queued_requests=0),
            "models.0",
            "`max_queued_requests` must be -1 (no bound) or at least 1",
            id="no-queue",
        ),
        # Requests past a replica's capacity are refused, never counted: it would never scale up.
        pytest.param(
            _config(max_ongoing_requests=8, max_queued_requests=8,
                    autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}),
            "models.0",
            "`autoscaling.target_ongoing_requests` (16) must be below what one replica takes "
            "(`max_ongoing_requests` + `max_queued_requests` = 16)",
            id="target-beyond-capacity",
        ),
        pytest.param(  # (a classical model's queue bound is each ingress replica's)
            {"ingress": {"num_replicas": 2}, "models": [{
                "name": "e", "engine": "sentence-transformers", "model": "org/e", "max_ongoing_requests": 4,
                "max_queued_requests": 2,
                "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
            }]},
            "models[0] ('e')",
            "`autoscaling.target_ongoing_requests` (8) must be below what one replica's load can "
            "reach (`max_ongoing_requests` + `ingress.num_replicas` × `max_queued_requests` = 8)",
            id="classical-target-beyond-capacity",
        ),
        pytest.param(
            _config(stream_max_hold_ms=0),
            "models.0",
            "`stream_max_hold_ms` was removed: streams no longer cross Serve handles",
            id="removed-stream-hold",
        ),
        pytest.param(
            _config(stream_messages_per_s=20),
            "models.0",
            "`stream_messages_per_s` was removed: streams no longer cross Serve handles",
            id="removed-stream-pacing",
        ),
        # Each engine takes its own settings: another engine's is refused, not ignored.
        pytest.param(
            _config(max_batch_size=8),
            "models.0.max_batch_size",
            "`max_batch_size` is not a setting of echo models; only sklearn and sentence-transformers models have it",
            id="batching-on-an-llm",
        ),
        pytest.param(
            {"models": [{"name": "m", "model": "org/m", "echo_token_delay_ms": 5}]},
            "models.0.echo_token_delay_ms",
            "only echo models have it",
            id="echo-setting-on-vllm",
        ),
        pytest.param(
            {"models": [{"name": "c", "engine": "sklearn", "model": "models:/iris/1", "engine_args": {"x": 1}}]},
            "models.0.engine_args",
            "only vllm models have it",
            id="engine-args-on-sklearn",
        ),
        pytest.param(
            {"models": [{"name": "e", "engine": "sentence-transformers", "model": "org/e", "stored_responses": 5}]},
            "models.0.stored_responses",
            "only vllm and echo models have it",
            id="stored-responses-on-embeddings",
        ),
        pytest.param(
            _config(autoscaling={"min_replicas": 0, "max_replicas": 4}),
            "models.0",
            "an LLM model does not scale to zero",
            id="llm-to-zero",
        ),
    ],
)
def test_invalid_config_names_field_and_reason(data: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="test.yaml")

    message = str(info.value)
    assert "test.yaml" in message
    assert f"  {field}: " in message
    assert reason in message


def test_missing_relative_model_directory_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "llm", "model": "./nope"}]})

    message = str(info.value)
    assert "models[llm].model" in message
    assert "'./nope' does not exist" in message


def test_existing_relative_model_directory_resolves_to_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "weights" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    config = parse_config({"models": [{"name": "llm", "model": "./weights/tiny"}]})

    resolved = config.model("llm").model
    assert resolved is not None
    assert Path(resolved).is_absolute()
    assert Path(resolved) == (tmp_path / "weights" / "tiny").resolve()


def test_hub_id_stays_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    config = parse_config({"models": [{"name": "llm", "model": "org/model"}]})

    assert config.model("llm").model == "org/model"


def test_app_builder_mapping_source_parses() -> None:
    # `serve run gateway.app:app_builder` or a Serve config passes the mapping as decoded.
    mapping = {
        "app_name": "gw",
        "route_prefix": "/api",
        "ingress": {"num_replicas": 2, "retry_after_s": 3},
        "models": [
            {"name": "echo", "engine": "echo", "max_model_len": 64, "echo_token_delay_ms": 1},
            {"name": "org/model", "model": "org/model", "engine_args": {"enable-prefix-caching": True}},
        ],
    }

    config = parse_config(mapping)

    assert config.app_name == "gw"
    assert config.route_prefix == "/api"
    assert config.ingress.num_replicas == 2
    assert config.ingress.retry_after_s == 3
    assert config.model("echo").max_model_len == 64
    assert config.model("echo").echo_token_delay_ms == 1
    assert config.model("org/model").engine == "vllm"
    assert config.model("org/model").engine_args == {"enable-prefix-caching": True}


def test_load_config_reads_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("models:\n  - name: echo\n    engine: echo\n    max_model_len: 64\n", encoding="utf-8")

    config = load_config(path)

    assert config.model("echo").max_model_len == 64


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("models:\n  - name: echo\n    engine: echo\n    num_cpus: 0\n", encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(path) in str(info.value)
    assert "models.0.num_cpus" in str(info.value)


def test_syntactically_broken_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("models: [\n  {name: echo\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("just some words\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"Input should be a valid dictionary"):
        load_config(path)


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    # e.g. a weights file passed by mistake: start-up must fail with ConfigError
    # (which the CLI prints), not a UnicodeDecodeError traceback.
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x89\xff\xfe\x00binary\x80\x81")

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path_is_a_config_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "absent.yaml" if kind == "missing" else tmp_path

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value).startswith(f"cannot read config {path}: ")


ROUTED_MODELS = [
    {"name": "a", "engine": "echo"},
    {"name": "b", "engine": "echo"},
    {"name": "e", "engine": "sentence-transformers", "model": "org/minilm"},
]


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([{"name": "chat", "variants": {"a": 80, "zz": 20}}], r"routes\[0\] \('chat'\): unknown variant\(s\) 'zz'"),
        ([{"name": "a", "variants": {"b": 1}}], r"routes\[0\] \('a'\): the alias collides with a model"),
        ([{"name": "c", "variants": {"a": -1, "b": 2}}], r"routes\.0\.variants: variant 'a' has a negative weight"),
        ([{"name": "c", "variants": {"a": 0, "b": 0}}], r"routes\.0\.variants: every variant has weight 0"),
        ([{"name": "c", "variants": {"a": float("inf"), "b": 1}}], r"routes\.0\.variants: the weights must be finite"),
        ([{"name": "c", "variants": {"a": 1e308, "b": 1e308}}], r"routes\.0\.variants: the weights must be finite"),
        ([{"name": "c", "variants": {}}], r"routes\.0\.variants"),
        (
            [{"name": "c", "variants": {"a": 1}}, {"name": "c", "variants": {"b": 1}}],
            r"routes\[1\] \('c'\): duplicate route name",
        ),
        (
            [{"name": "c", "variants": {"a": 1, "e": 1}}],
            r"routes\[0\] \('c'\): variants mix model kinds \('a' is llm, 'e' is embedding\)",
        ),
        (
            [{"name": "c", "variants": {"a": 1}, "shadow": {"variant": "e", "percent": 5}}],
            r"routes\[0\] \('c'\): variants mix model kinds",
        ),
    ],
    ids=[
        "unknown-target",
        "collides-with-model",
        "negative",
        "all-zero",
        "infinite",
        "infinite-sum",
        "empty",
        "duplicate",
        "mixed-kinds",
        "shadow-of-another-kind",
    ],
)
def test_invalid_routes_are_refused_naming_the_entry(routes: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": ROUTED_MODELS, "routing": {"routes": routes}})


def test_valid_route_and_cohort_header() -> None:
    config = parse_config(
        {
            "models": ROUTED_MODELS,
            "routing": {"cohort_header": "x-user", "routes": [{"name": "chat", "variants": {"a": 4, "b": 1}}]},
        }
    )
    assert config.routing.cohort_header == "x-user"
    assert config.routing.routes[0].variants == {"a": 4.0, "b": 1.0}


@pytest.mark.parametrize("header", ["x-сессия", "x session", "x-user:"])
def test_a_cohort_header_that_is_no_header_name_is_refused_at_load(header: str) -> None:
    # One not Latin-1 failed every request without a `user` (500); one with
    # a space or colon matched nothing, stickiness off unsaid.
    with pytest.raises(ConfigError, match="cohort_header"):
        parse_config({"models": ROUTED_MODELS, "routing": {"cohort_header": header}})


def test_engines_name_their_kind() -> None:
    config = parse_config({"models": ROUTED_MODELS})
    assert [m.kind for m in config.models] == ["llm", "llm", "embedding"]


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"name": "llm", "model": "~no-such-user-here/m"}, "models[llm].model"),
        ({"name": "llm", "model": "org/m", "lora_adapters": {"a": "~no-such-user-here/a"}}, "models[llm].lora_adapters.a"),
    ],
)
def test_a_path_under_a_user_with_no_home_here_is_a_config_error(model: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:  # not a traceback from pathlib
        parse_config({"models": [model]})
    assert field in str(info.value) and "no home directory" in str(info.value)


def test_sklearn_model_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[iris\]\.model: 'iris.joblib' does not exist"):
        parse_config({"models": [{"name": "iris", "engine": "sklearn", "model": "iris.joblib"}]}, base_dir=tmp_path)
    (tmp_path / "iris.joblib").write_bytes(b"")
    config = parse_config({"models": [{"name": "iris", "engine": "sklearn", "model": "iris.joblib"}]}, base_dir=tmp_path)
    assert config.models[0].model == str(tmp_path / "iris.joblib")


def test_live_fields_stay_out_of_deployment_arguments() -> None:
    model = parse_config(
        {"models": [{**ROUTED_MODELS[2], "num_replicas": 3, "max_batch_size": 8, "batch_wait_timeout_s": 0.1}]}
    ).models[0]
    args = model.deployment_args()
    assert "num_replicas" not in args and "max_batch_size" not in args and "batch_wait_timeout_s" not in args
    assert args["model"] == "org/minilm" and args["max_instances_per_request"] == 256
    assert model.batching() == {"max_batch_size": 8, "batch_wait_timeout_s": 0.1}


def test_assemble_validates_models_and_routes_together() -> None:
    config = parse_config({"app_name": "gw", "models": ROUTED_MODELS})
    again = GatewayConfig.assemble(config.front_door(), [m.model_dump() for m in config.models], {})
    assert again.app_name == "gw" and again.models == config.models
    with pytest.raises(ConfigError, match="ingress user_config"):
        GatewayConfig.assemble(config.front_door(), [], {})


def test_gathering_is_for_batched_classical_models_and_grows_with_replicas() -> None:
    from gateway.config import EchoModelConfig, SklearnModelConfig
    from gateway.http.gather import Gathering

    def gathering(**fields: Any) -> Gathering | None:
        return Gathering.for_model(SklearnModelConfig(name="c", model="models:/iris/1", **fields))

    assert gathering(max_batch_size=32, batch_wait_timeout_s=0) == (32, 2, None, None)
    assert gathering(num_replicas=3, batch_wait_timeout_s=0) == (32, 6, None, None)
    assert gathering(autoscaling={"min_replicas": 1, "max_replicas": 4}, batch_wait_timeout_s=0) == (32, 8, None, None)
    # Batches that wait for company never wait on requests the ingress holds.
    assert gathering(batch_wait_timeout_s=0.004) == (32, 2, 0.002, None)
    assert gathering(batch_wait_timeout_s=10) == (32, 2, 0.005, None)
    assert gathering(max_batch_size=1) is None  # batching off
    assert Gathering.for_model(EchoModelConfig(name="e")) is None  # LLMs stream and batch in the engine


@pytest.mark.parametrize(
    ("key", "field"),
    [("max-model-len", "max_model_len"), ("served_model_name", "name"), ("tensor-parallel-size", "tensor_parallel_size")],
)
def test_engine_args_the_gateway_sets_itself_are_refused_naming_the_field(key: str, field: str) -> None:
    # vLLM takes the last of a flag given twice: /v1/models, routing and placement would be wrong.
    with pytest.raises(ConfigError, match=f"`{field}`"):
        parse_config({"models": [{"name": "m", "engine": "vllm", "model": "org/m", "engine_args": {key: 2}}]})


@pytest.mark.parametrize("key", ["api-key", "api_key", "config", "allowed-origins", "port", "ssl-keyfile"])
def test_engine_args_of_vllms_own_http_server_are_refused(key: str) -> None:
    # Accepted, they did nothing: an operator setting `api-key` believed the engine protected, and `config`
    # read further arguments (data parallelism, say) from a file past every check here.
    with pytest.raises(ConfigError, match=r"vLLM's own HTTP server"):
        parse_config({"models": [{"name": "m", "engine": "vllm", "model": "org/m", "engine_args": {key: "x"}}]})


def test_the_refused_http_server_settings_are_vllms_own_flags() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from gateway.config.engines import SERVER_ENGINE_ARGS

    flags = {option for action in make_arg_parser(FlexibleArgumentParser())._actions for option in action.option_strings}
    assert {f"--{name}" for name in SERVER_ENGINE_ARGS} <= flags


def test_a_kv_cache_size_set_twice_is_refused() -> None:
    # On CPU vLLM took VLLM_CPU_KVCACHE_SPACE (kv_cache_space_gib) over kv-cache-memory-bytes, without a word.
    model = {"name": "m", "engine": "vllm", "model": "org/m", "engine_args": {"kv-cache-memory-bytes": 2**33}}
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"models": [{**model, "kv_cache_space_gib": 1}]})
    parse_config({"models": [model]})
    parse_config({"models": [{**model, "kv_cache_space_gib": 1, "num_gpus": 1}]})  # on a GPU the former is unread


@pytest.mark.parametrize(
    "key", ["data-parallel-size", "data_parallel_backend", "no-data-parallel-hybrid-lb", "prefill-context-parallel-size",
            "nnodes"],
)
def test_engine_args_that_change_an_engines_workers_are_refused(key: str) -> None:
    # Ray reserves tensor x pipeline parallel workers on one node: vLLM would start more, or elsewhere.
    with pytest.raises(ConfigError, match=r"changes how many workers vLLM starts.*`num_replicas`"):
        parse_config({"models": [{"name": "m", "engine": "vllm", "model": "org/m", "engine_args": {key: 2}}]})
    allowed = {"decode-context-parallel-size": 2}  # (within the tensor-parallel workers)
    parse_config({"models": [{"name": "m", "engine": "vllm", "model": "org/m", "engine_args": allowed}]})


@pytest.mark.parametrize("prefix", ["/api/", "/a/{b}", "api", "//"])
def test_a_route_prefix_serve_would_refuse_once_deployed_is_refused_at_load(prefix: str) -> None:
    with pytest.raises(ConfigError, match="route_prefix"):
        parse_config({"route_prefix": prefix, "models": [{"name": "echo", "engine": "echo"}]})
    assert parse_config({"route_prefix": "/v", "models": [{"name": "echo", "engine": "echo"}]}).route_prefix == "/v"


@pytest.mark.parametrize("name", ["org/model/", "org//model"])
def test_a_model_name_its_own_models_page_could_not_find_is_refused(name: str) -> None:
    # GET /v1/models/org/model/ is redirected to /v1/models/org/model: a 404.
    with pytest.raises(ConfigError, match="name"):
        parse_config({"models": [{"name": name, "engine": "echo"}]})
    assert parse_config({"models": [{"name": "org/sub/model-1.5", "engine": "echo"}]}).models[0].name


ECHO = [{"name": "e", "engine": "echo"}]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("stderr", "stderr"),
        ("off", "off"),
        ("logs/access.log", "{base}/logs/access.log"),
        ("~/access.log", "{home}/access.log"),
        ("/var/log/gw/../access.log", "/var/log/access.log"),
    ],
)
def test_an_access_log_file_is_opened_where_the_config_says_from_any_working_directory(
    tmp_path: Path, given: str, expected: str
) -> None:
    config = parse_config({"ingress": {"access_log": given}, "models": ECHO}, base_dir=tmp_path)
    assert config.ingress.access_log == expected.format(base=tmp_path, home=Path.home())


def test_off_written_bare_in_yaml_is_off(tmp_path: Path) -> None:
    # YAML reads a bare `off` as false: README's own `access_log: off` was refused as no string.
    path = tmp_path / "gateway.yaml"
    path.write_text("ingress:\n  access_log: off\nruntime:\n  gateway_cpus: off\nmodels:\n  - {name: e, engine: echo}\n")
    config = load_config(path)
    assert (config.ingress.access_log, config.runtime.gateway_cpus) == ("off", "off")


def test_an_access_log_under_an_unknown_users_home_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"ingress.access_log: '~no-such-user-here/a.log' names a user"):
        parse_config({"ingress": {"access_log": "~no-such-user-here/a.log"}, "models": ECHO})


def test_an_llm_scales_between_replica_counts() -> None:
    config = parse_config(_config(autoscaling={"min_replicas": 1, "max_replicas": 4}))
    assert config.models[0].max_replicas == 4


def test_a_key_given_twice_in_a_yaml_mapping_is_refused_naming_it(tmp_path: Path) -> None:
    # YAML's loader kept the last: a live weight edit of `a: 80` beside an old `a: 20` weighed 20.
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "models:\n  - {name: a, engine: echo}\n  - {name: b, engine: echo}\n"
        "routing:\n  routes:\n    - name: r\n      variants:\n        a: 80\n        b: 20\n        a: 20\n"
    )
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML: .*the key 'a' is given twice.*line 10"):
        load_config(path)
    path.write_text("models:\n  - {name: a, engine: echo}\nrouting: {routes: [{name: r, variants: {a: 1}}]}\n")
    assert load_config(path).routing.routes[0].variants == {"a": 1}


def test_yaml_merge_keys_still_work_and_an_odd_key_is_a_config_error(tmp_path: Path) -> None:
    # The unique-key loader refused `<<: *base` (no constructor for the merge tag), which safe_load takes.
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "models:\n  - &a {engine: echo, echo_token_delay_ms: 5, name: a}\n"
        "  - <<: *a\n    name: b\n    echo_token_delay_ms: 7\n"
    )
    models = load_config(path).models
    assert [(m.name, getattr(m, "echo_token_delay_ms")) for m in models] == [("a", 5), ("b", 7)]
    path.write_text("? [a, b]\n: 1\n")  # a key no mapping can hold: refused as YAML, not a traceback
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
