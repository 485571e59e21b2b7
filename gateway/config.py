"""The gateway's configuration: a YAML file validated once, when the app is built.

Every field has a description; an invalid file fails start-up with
:class:`ConfigError` naming the field and the reason.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Name clients use in the request's `model` field.",
    ),
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Engine = Literal["vllm", "echo", "sklearn", "sentence-transformers"]
MLFLOW_SCHEMES = ("models:/", "runs:/")
EMBEDDING_DTYPES = ("auto", "float32", "bfloat16", "float16")
ModelKind = Literal["llm", "classifier", "embedding"]

# What each engine serves: routes never mix kinds, and each endpoint accepts
# only the kinds that can answer it.
ENGINE_KINDS: dict[str, ModelKind] = {
    "vllm": "llm",
    "echo": "llm",
    "sklearn": "classifier",
    "sentence-transformers": "embedding",
}

# vLLM's engine argument holding its structured-output settings (backend,
# whitespace); given in `engine_args`, it replaces `json_whitespace`.
STRUCTURED_OUTPUTS_ARG = "structured-outputs-config"

# Fields of earlier releases, refused with the reason rather than ignored.
REMOVED_MODEL_FIELDS = {
    name: "streams no longer cross Serve handles, so nothing holds their tokens back "
    "(each replica serves its streams on its own port)"
    for name in ("stream_messages_per_s", "stream_max_hold_ms")
}

# Fields a redeploy applies to running replicas (replica count, batching):
# they stay out of a model's deployment arguments, so changing them restarts
# nothing.
LIVE_MODEL_FIELDS = frozenset(
    {"num_replicas", "autoscaling", "max_batch_size", "batch_wait_timeout_s"}
)


class AutoscalingConfig(_Strict):
    """Replica autoscaling of one model (Ray Serve's autoscaling_config)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at start-up; `min_replicas` when unset."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="How long load must stay high before adding replicas."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="How long load must stay low before removing replicas."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


PlacementStrategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]


DEFAULT_STORED_RESPONSES = 1000


class ModelConfig(_Strict):
    """Settings every served model has, whatever its engine: its name, where
    its weights are, and its deployment (replicas, resources, queueing,
    timeouts). Each engine's config (``VLLMModelConfig``, ``EchoModelConfig``,
    ``SklearnModelConfig``, ``EmbeddingModelConfig``) adds its own; a config
    file's entry becomes the one its ``engine`` names (``parse_model``)."""

    name: ModelName
    engine: Engine = Field(
        "vllm",
        description="`vllm` runs a real vLLM engine; `echo` answers deterministically "
        "at near-zero cost (tests, overhead measurement); `sklearn` serves a "
        "scikit-learn estimator file (joblib); `sentence-transformers` serves a "
        "sentence-embedding model directory. Each engine takes its own settings "
        "beside the shared ones; a setting of another engine is refused.",
    )
    model: str | None = Field(
        None,
        description="Hugging Face model directory or hub id (vllm, sentence-transformers), "
        "or a joblib estimator file or a directory holding `model.joblib` (sklearn), "
        "or an MLflow model URI (sklearn: `models:/name/1`, `models:/name@alias`, "
        "`runs:/<run id>/model`; needs the `mlflow` extra). "
        "Relative paths resolve against the working directory at start-up.",
    )
    num_replicas: int = Field(
        1, ge=1, description="Replicas of this model's deployment (without `autoscaling`)."
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale replicas with load instead of a fixed `num_replicas`."
    )
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved for each replica actor.")
    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs reserved for each single-worker replica; fractions (e.g. 0.5) "
        "let small models share a GPU. Multi-worker replicas use `gpus_per_worker`.",
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one replica works on at once (the engine batches them)."
    )
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Requests waiting for a replica before new ones get 503; -1 is unbounded "
        "(0 is not accepted: Ray Serve holds no deployment without a queue; use 1).",
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest a request to this model may take, from when the ingress sends it "
        "to its last byte, streams included: past it the engine request is aborted and the "
        "client gets 504 `request_timeout` (a stream that has started: an error frame, then "
        "[DONE]). None: no limit.",
    )
    graceful_shutdown_s: float = Field(
        60,
        ge=0,
        le=3600,
        description="When a replica stops (scaled down, replaced by a changed config, the "
        "gateway stopped), how long its requests in flight, streams included, may run on "
        "while it takes no new ones; those still running then are cut off.",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            for name in sorted(data.keys() & REMOVED_MODEL_FIELDS.keys()):
                raise ValueError(f"`{name}` was removed: {REMOVED_MODEL_FIELDS[name]}")
        return data

    @model_validator(mode="after")
    def _shared_rules(self) -> ModelConfig:
        if self.engine != "echo" and not self.model:
            raise ValueError(f"`model` is required when engine is `{self.engine}`")
        if self.mlflow_uri and self.engine != "sklearn":
            raise ValueError("MLflow model URIs are served by the `sklearn` engine only")
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set either `num_replicas` or `autoscaling`, not both")
        if self.max_queued_requests == 0:
            # Serve refuses it only when the model is deployed, after the gateway started.
            raise ValueError("`max_queued_requests` must be -1 (no bound) or at least 1")
        return self

    @property
    def mlflow_uri(self) -> bool:
        """Whether ``model`` names a model in MLflow (``models:/...``, ``runs:/...``)."""
        return self.model is not None and self.model.startswith(MLFLOW_SCHEMES)

    @property
    def workers(self) -> int:
        """Engine workers per replica (more than one only for parallel LLMs)."""
        return 1

    @property
    def kind(self) -> ModelKind:
        """What the model answers: `llm` (chat, completions), `classifier`, `embedding`."""
        return ENGINE_KINDS[self.engine]

    @property
    def max_replicas(self) -> int:
        """The most replicas the model may run."""
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    def deployment_args(self) -> dict[str, object]:
        """The fields that shape a replica: a change to any of them restarts it."""
        return self.model_dump(mode="json", exclude=set(LIVE_MODEL_FIELDS))

    def resolved(self, base_dir: Path) -> ModelConfig:
        """A copy whose local model path is absolute, relative ones taken from
        ``base_dir`` (hub ids stay as given)."""
        if self.model is None or self.mlflow_uri:
            return self
        path = base_dir / Path(self.model).expanduser()
        if path.exists():
            return self.model_copy(update={"model": str(path.resolve())})
        if self.engine == "sklearn" or self.model.startswith((".", "/", "~")):
            raise ConfigError(
                f"models[{self.name}].model: {self.model!r} does not exist "
                "(run `llm-gateway build-model` for the local models)"
            )
        return self


class LLMModelConfig(ModelConfig):
    """What LLM engines (vllm, echo) share: the context window, parallel
    workers and their placement, stored responses."""

    max_model_len: int | None = Field(
        None, ge=16, description="Context window in tokens; the model's own when unset."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel workers per replica.")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages per replica; workers = tensor x pipeline."
    )
    gpus_per_worker: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Replicas with more than one worker: GPUs of each worker's bundle "
        "(vLLM takes at most one per worker; 0 on CPU-only clusters).",
    )
    cpus_per_worker: float = Field(
        1.0, ge=0, description="Replicas with more than one worker: CPUs of each worker's bundle."
    )
    placement_strategy: PlacementStrategy | None = Field(
        None,
        description="How a multi-worker replica's bundles are placed. Unset: STRICT_PACK "
        "(every worker of a replica on one node). PACK, SPREAD or STRICT_SPREAD only "
        "when asked.",
    )
    stored_responses: int | None = Field(
        None,
        ge=0,
        description="LLMs: Responses API responses each replica keeps (those made with "
        "`store`, OpenAI's default), for `GET /v1/responses/{id}` and `previous_response_id`; "
        "past it the oldest is dropped. They live in the replica's memory: gone when it "
        f"stops. 0 keeps none. Unset: {DEFAULT_STORED_RESPONSES}.",
    )

    @model_validator(mode="after")
    def _workers_take_bundles(self) -> LLMModelConfig:
        if self.workers > 1 and self.num_gpus > 0:
            raise ValueError(
                "`num_gpus` is for single-worker replicas; a replica with "
                f"{self.workers} workers takes `gpus_per_worker` in each worker's bundle"
            )
        return self

    @property
    def workers(self) -> int:
        """Engine workers per replica: tensor x pipeline parallel size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def kept_responses(self) -> int:
        """Stored responses each replica keeps (``stored_responses``, or its default)."""
        return DEFAULT_STORED_RESPONSES if self.stored_responses is None else self.stored_responses


class VLLMModelConfig(LLMModelConfig):
    """A model served by a real vLLM engine."""

    engine: Literal["vllm"] = "vllm"
    dtype: str = Field("auto", description="Weights and activations dtype, passed to vLLM.")
    seed: int = Field(0, description="Engine seed for requests that set none.")
    kv_cache_space_gib: int | None = Field(
        None,
        ge=1,
        description="KV-cache size in whole GiB on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU.",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory vLLM may take (GPU only)."
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool-call parser (e.g. `hermes`); enables `tool_choice` "
        "`auto` and named tools for models whose template renders tools.",
    )
    json_whitespace: Literal["compact", "any"] | None = Field(
        None,
        description="vllm: whitespace in constrained JSON (`response_format` "
        "`json_schema`/`json_object`, and the arguments of tool calls forced by "
        "`tool_choice`). `compact`: none between tokens, as OpenAI's structured outputs "
        "look; vLLM's `xgrammar` backend enforces it. `any`: vLLM's own default, any "
        "whitespace the grammar allows, which small models can emit until `max_tokens`. "
        "Unset: `compact`, unless `engine_args` holds a `structured-outputs-config`.",
    )
    engine_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments by their CLI name without `--` "
        "(e.g. `enable-prefix-caching: true`); checked by vLLM's parser at start-up.",
    )

    @model_validator(mode="after")
    def _one_whitespace_setting(self) -> VLLMModelConfig:
        if self.json_whitespace is not None and STRUCTURED_OUTPUTS_ARG in self.engine_args:
            raise ValueError(
                f"set either `json_whitespace` or `engine_args.{STRUCTURED_OUTPUTS_ARG}`, not both"
            )
        return self


class EchoModelConfig(LLMModelConfig):
    """The echo engine: deterministic answers at near-zero cost."""

    engine: Literal["echo"] = "echo"
    echo_token_delay_ms: float = Field(
        0.0,
        ge=0,
        description="Echo engine only: time per generated token (between streamed tokens, or "
        "all before a whole answer), to stand in for decode time in tests and overhead "
        "measurements.",
    )


class ClassicalModelConfig(ModelConfig):
    """What classical models (sklearn, sentence-transformers) share: batching
    (changed live by a redeploy) and the most instances per request."""

    max_batch_size: int = Field(
        32,
        ge=1,
        description="Classical models: requests one batch may hold (1 turns batching "
        "off). Changed live by a redeploy.",
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        description="Classical models: how long a batch that is not full waits for "
        "more requests. Changed live by a redeploy.",
    )
    max_instances_per_request: int = Field(
        256,
        ge=1,
        description="Classical models: instances (or embedding inputs) one request "
        "may carry; more is a 400.",
    )

    def batching(self) -> dict[str, float]:
        """The live batching settings a classical replica receives as `user_config`."""
        return {
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
        }


class SklearnModelConfig(ClassicalModelConfig):
    """A scikit-learn estimator (joblib file, or a model in MLflow)."""

    engine: Literal["sklearn"] = "sklearn"
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking and registry URI that `models:/` and `runs:/` "
        "model URIs are looked up in (e.g. `sqlite:///mlflow.db`, `http://mlflow:5000`). "
        "Unset: MLflow's own default (`MLFLOW_TRACKING_URI`).",
    )


class EmbeddingModelConfig(ClassicalModelConfig):
    """A sentence-transformers embedding model."""

    engine: Literal["sentence-transformers"] = "sentence-transformers"
    dtype: str = Field(
        "auto",
        description="`float32`, `bfloat16`, `float16`, or `auto`: bfloat16 on CPUs with "
        "native bf16 arithmetic (AVX512-BF16 or AMX), float16 on GPU, float32 elsewhere.",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="sentence-transformers only: torch's intra-op threads in the replica. "
        "Unset: Ray's choice (the replica's whole CPUs, at least 1). Large batches "
        "gain from more threads; single requests do not.",
    )

    @field_validator("dtype")
    @classmethod
    def _embedding_dtype(cls, dtype: str) -> str:
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(EMBEDDING_DTYPES)}")
        return dtype


ENGINE_CONFIGS: dict[str, type[ModelConfig]] = {
    "vllm": VLLMModelConfig,
    "echo": EchoModelConfig,
    "sklearn": SklearnModelConfig,
    "sentence-transformers": EmbeddingModelConfig,
}


def _engine_of(data: object) -> str:
    """A model entry's engine: its ``engine`` (vllm when unset)."""
    if isinstance(data, dict):
        return str(data.get("engine", "vllm"))
    return str(getattr(data, "engine", "vllm"))


# A config file's model entry: the config of the engine it names.
AnyModelConfig = Annotated[
    Annotated[VLLMModelConfig, Tag("vllm")]
    | Annotated[EchoModelConfig, Tag("echo")]
    | Annotated[SklearnModelConfig, Tag("sklearn")]
    | Annotated[EmbeddingModelConfig, Tag("sentence-transformers")],
    Discriminator(
        _engine_of,
        custom_error_type="engine",
        custom_error_message="`engine` must be one of " + ", ".join(ENGINE_KINDS),
    ),
]

_MODEL = TypeAdapter(AnyModelConfig)


def parse_model(data: object) -> ModelConfig:
    """One model entry, as the config of its engine; raises pydantic's ValidationError."""
    return _MODEL.validate_python(data)  # type: ignore[no-any-return]


def engines_with(field: str) -> list[str]:
    """The engines that have the setting ``field``."""
    return [engine for engine, cls in ENGINE_CONFIGS.items() if field in cls.model_fields]


# An origin as browsers send it: scheme, host and an optional port; no path.
_ORIGIN = re.compile(r"^https?://[^/\s?#]+/?$", re.IGNORECASE)


class CorsConfig(_Strict):
    """Cross-origin access for chat apps that call the gateway from a browser
    page served elsewhere (the OpenAI and Anthropic JS SDKs in a browser)."""

    allow_origins: list[str] = Field(
        min_length=1,
        description="Origins whose pages may call the gateway (`https://chat.example.com`), "
        "or `*` for any page: with no API keys, any page a user of this host opens could "
        "then use the models.",
    )
    allow_methods: list[str] = Field(
        ["GET", "POST", "DELETE"], min_length=1, description="Methods a page may use (`*`: any)."
    )
    allow_headers: list[str] = Field(
        ["*"],
        description="Request headers a page may send (`*`: any it asks for in the preflight, "
        "e.g. `authorization`, `content-type` and the SDKs' `x-stainless-*`).",
    )
    allow_credentials: bool = Field(
        False,
        description="Whether pages may send cookies or HTTP authentication (API keys in "
        "`Authorization` or `x-api-key` need no credentials); not with `*` origins.",
    )
    max_age_s: int = Field(600, ge=0, le=86400, description="How long browsers keep a preflight's answer.")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"`{origin}` is not an origin: `*`, or scheme and host with an optional port "
                    "and no path (`https://chat.example.com:8443`)"
                )
        # As browsers send it: lower case, no trailing slash.
        return [origin.rstrip("/").lower() for origin in origins]

    @model_validator(mode="after")
    def _credentials(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("`allow_credentials` needs the origins named: not with `*`")
        return self


class IngressConfig(_Strict):
    """The HTTP front door (FastAPI under @serve.ingress)."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved for each ingress replica.")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one ingress replica handles at once."
    )
    retry_after_s: int = Field(
        1, ge=0, description="`Retry-After` seconds sent with 503 when a model is busy or down."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; larger ones are answered 413 before "
        "they are read whole.",
    )
    graceful_shutdown_s: float = Field(
        60,
        ge=0,
        le=3600,
        description="When an ingress replica stops (scaled down, or the gateway stopped), how "
        "long the requests it is serving, streams included, may run on; the models' own "
        "`graceful_shutdown_s` bounds their side.",
    )
    replica_wait_s: float = Field(
        5,
        ge=0,
        le=600,
        description="How long a request waits for its model to have a running replica "
        "(starting, or replacing one that died) before it is answered 503 with "
        "`Retry-After`; while the model stays down, later requests are answered at once.",
    )
    read_timeout_s: float = Field(
        30,
        gt=0,
        le=3600,
        description="A request's headers, and then its body, must each arrive within this "
        "many seconds; slower ones (a stalled or slow-loris client) are answered 408. "
        "HAProxy bounds the headers (`runtime.http_proxy: haproxy`), the ingress the body.",
    )
    access_log: str = Field(
        "stderr",
        min_length=1,
        description="Where each ingress replica writes its JSON access log: `stderr`, `off`, "
        "or a file path that every replica appends to.",
    )
    cors: CorsConfig | None = Field(
        None,
        description="Cross-origin access from browser pages (CORS); none by default: only "
        "pages served by the gateway's own origin may call it from a browser.",
    )


class ShadowConfig(_Strict):
    """Mirrors part of a route's traffic to a model whose answers are discarded."""

    variant: str = Field(description="Concrete model that receives the copies.")
    percent: float = Field(ge=0, le=100, description="Share of the route's requests copied.")


class RouteConfig(_Strict):
    """An alias clients may use in `model`, spread over concrete models by weight."""

    name: ModelName
    variants: dict[str, float] = Field(
        min_length=1,
        description="Concrete model name -> weight (>= 0; 0 takes no traffic). "
        "Weights are relative: 80/20 and 4/1 split alike.",
    )
    fallback: bool = Field(
        False,
        description="When the chosen variant is unavailable or fails before the first "
        "byte (5xx), try the next variant by weight; never after the first byte.",
    )
    shadow: ShadowConfig | None = Field(
        None, description="Copies of requests sent in the background; answers discarded."
    )

    @field_validator("variants")
    @classmethod
    def _weights(cls, variants: dict[str, float]) -> dict[str, float]:
        for name, weight in variants.items():
            if weight < 0:
                raise ValueError(f"variant {name!r} has a negative weight ({weight:g})")
        if not any(weight > 0 for weight in variants.values()):
            raise ValueError("every variant has weight 0: the route could serve nothing")
        return variants


class RoutingConfig(_Strict):
    """How requests pick a variant of a route."""

    cohort_header: str = Field(
        "x-session-id",
        min_length=1,
        description="Request header whose value keeps a client on one variant "
        "(OpenAI's `user` field does the same and wins when both are sent).",
    )
    routes: list[RouteConfig] = Field(
        default_factory=list, description="Aliases over weighted variants."
    )
    seed: int | None = Field(
        None,
        description="Seeds the random choices (variants of requests without a cohort, shadow "
        "copies) on each ingress replica, afresh on every deploy: the same sequence each time, "
        "for tests and replays. None: fresh randomness.",
    )


class RuntimeConfig(_Strict):
    """How `llm-gateway serve` starts a local Ray cluster (no effect on an existing one)."""

    http_proxy: Literal["haproxy", "serve"] = Field(
        "haproxy",
        description="`haproxy`: Ray's HAProxy ingress forwards HTTP straight to the "
        "ingress replicas; `serve`: Ray Serve's Python proxy actor.",
    )
    throughput_optimized: bool = Field(
        True,
        description="Ray Serve's throughput mode: user code and routing on the "
        "replica's own event loop, gRPC between deployments.",
    )
    worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="Scheduling niceness of Ray workers. Ray's default (15) yields "
        "the CPU to anything else on the machine; the gateway's workers are the server.",
    )

    gateway_cpus: Literal["auto", "off"] | list[Annotated[int, Field(ge=0)]] = Field(
        "off",
        description="CPUs the gateway's own processes (Ray's daemons, Serve's controller "
        "and proxy, HAProxy, the ingress and metrics replicas) are pinned to, away from "
        "the cores vLLM's CPU engine computes on. `off` (default; on 2 vCPUs pinning "
        "measured no gain: the one reserved core then also holds vLLM's scheduler and "
        "serving layer); `auto`: on hosts without a GPU, the CPUs vLLM's CPU backend "
        "reserves for other processes (the last `VLLM_CPU_NUM_OF_RESERVED_CPU`, one by "
        "default); or a list of CPU ids.",
    )
    haproxy_threads: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto",
        description="Threads of HAProxy, the front door. `auto` (default): half this "
        "machine's CPUs, at least 1 and at most 4 (Ray's own default), and no more than "
        "`gateway_cpus` lists; or a count. Threads beyond the cores the host can spare "
        "compete with the engine's: on 2 vCPUs one thread streamed 1.05-1.40x the tokens/s "
        "of four at 8 concurrent streams.",
    )
    background_niceness: int = Field(
        19,
        ge=0,
        le=19,
        description="Scheduling niceness of the gateway's processes that no request waits "
        "on: Serve's controller (and its Python proxy behind HAProxy), the metrics hub, "
        "Ray's agents and monitors, `llm-gateway serve` itself. On a busy CPU host their "
        "periodic work then waits for the engine instead of stalling its steps; the "
        "request path (HAProxy, the ingress, model replicas and engines, Ray's GCS and "
        "raylet) keeps `worker_niceness`. 0 leaves them alone.",
    )

    def haproxy_thread_count(self) -> int:
        """``haproxy_threads`` resolved on this machine."""
        if self.haproxy_threads != "auto":
            return self.haproxy_threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = min(4, max(1, cpus // 2))
        if isinstance(self.gateway_cpus, list):
            threads = min(threads, max(1, len(set(self.gateway_cpus))))
        return threads

    def environment(self) -> dict[str, str]:
        """Variables Ray and Ray Serve read when the local cluster starts."""
        return {
            "RAY_SERVE_HAPROXY_NBTHREAD": str(self.haproxy_thread_count()),
            "RAY_worker_niceness": str(self.worker_niceness),
            # Engine processes die with their replica, even when it is killed.
            "RAY_process_group_cleanup_enabled": "1",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if self.throughput_optimized else "0",
            "RAY_SERVE_ENABLE_HA_PROXY": "1" if self.http_proxy == "haproxy" else "0",
            # Serve's HTTP metrics from HAProxy cost a log line per request that
            # HAProxy writes and Serve's HAProxy manager parses; the gateway
            # counts every request itself (gateway_requests_total and the rest).
            "RAY_SERVE_HAPROXY_METRICS_ENABLED": os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED", "0"),
            # Serve's replicas decode its session header (`x-session-id` by
            # default, also the gateway's cohort header) as strict UTF-8 before
            # the gateway sees the request; the gateway does not use Serve's
            # session routing, so Serve is pointed at a header nobody sends.
            "RAY_SERVE_SESSION_ID_HEADER_KEY": "x-llm-gateway-serve-session",
            # Serve keeps a stopping replica of an application's ingress
            # deployment reachable this long before it drains (30 s by default)
            # so that load balancers deregister it. Each model is an application
            # of its own, reached only through the gateway's relay, which moves to
            # another replica when one refuses; HAProxy retries refused
            # connections too. Without this every scale-down or replacement
            # takes 30 s more than its requests need.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        }


KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


class KeyConfig(_Strict):
    """An API key: its hash (never the secret), the models it may use and its limits.

    ``llm-gateway keys new`` makes a secret and prints this entry for it.
    """

    id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The key's name: safe to log; labels its metrics and access log lines.",
    )
    hash: str = Field(
        pattern=KEY_HASH_PATTERN, description="`sha256:` and the hex SHA-256 of the secret."
    )
    models: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"],
        description="Model and alias names (glob patterns allowed) the key may use. "
        "An alias lets the key reach its variants through it.",
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute (none: unlimited).")
    tpm: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute, prompt and completion together (none: unlimited).",
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests of this key in flight at once (none: unlimited)."
    )
    expires: datetime | None = Field(
        None, description="When the key stops working (ISO 8601 with a time zone)."
    )
    ops: bool = Field(
        False,
        description="An operations key: it reaches /health, /ready and /metrics (which then "
        "need one) and nothing under /v1 or /v2.",
    )

    @field_validator("expires")
    @classmethod
    def _aware(cls, expires: datetime | None) -> datetime | None:
        if expires is not None and expires.tzinfo is None:
            raise ValueError("give a time zone (e.g. 2027-01-31T00:00:00Z)")
        return expires

    @model_validator(mode="after")
    def _ops_key_has_no_models_or_limits(self) -> KeyConfig:
        if self.ops:
            for name in ("rpm", "tpm", "max_concurrent"):
                if getattr(self, name) is not None:
                    raise ValueError(f"ops key {self.id!r}: {name} applies to API keys only")
            if self.models != ["*"]:
                raise ValueError(f"ops key {self.id!r}: models applies to API keys only")
        return self

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent))


class FrontDoorConfig(_Strict):
    """The ingress application's own settings (what its replicas are built from)."""

    app_name: str = Field("llm-gateway", min_length=1, description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP path prefix of the app.")
    ingress: IngressConfig = Field(
        default_factory=IngressConfig, description="The HTTP front door."
    )


class GatewayConfig(_Strict):
    """The whole gateway: the models it serves and its front door."""

    app_name: str = Field("llm-gateway", min_length=1, description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP path prefix of the app.")
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig,
        description="How `llm-gateway serve` starts a local Ray cluster.",
    )
    ingress: IngressConfig = Field(
        default_factory=IngressConfig, description="The HTTP front door."
    )
    models: list[AnyModelConfig] = Field(min_length=1, description="Served models.")
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="Aliases and how variants are chosen."
    )
    keys: list[KeyConfig] = Field(
        default_factory=list,
        description="API keys clients must send as `Authorization: Bearer <key>` on /v1 "
        "and /v2 routes (none: the gateway is open to whoever reaches it).",
    )

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, keys: list[KeyConfig]) -> list[KeyConfig]:
        ids: set[str] = set()
        hashes: set[str] = set()
        for key in keys:
            if key.id in ids:
                raise ValueError(f"duplicate key id {key.id!r}")
            if key.hash in hashes:
                raise ValueError(f"key {key.id!r} has the same hash as another key")
            ids.add(key.id)
            hashes.add(key.hash)
        return keys

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[AnyModelConfig]) -> list[AnyModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"duplicate model name {model.name!r}")
            seen.add(model.name)
        return models

    @model_validator(mode="after")
    def _routes_name_served_models(self) -> GatewayConfig:
        models = {m.name: m for m in self.models}
        seen: set[str] = set()
        for index, route in enumerate(self.routing.routes):
            where = f"routing.routes[{index}] ({route.name!r})"
            if route.name in models:
                raise ValueError(f"{where}: the alias collides with a model of the same name")
            if route.name in seen:
                raise ValueError(f"{where}: duplicate route name")
            seen.add(route.name)
            unknown = sorted(set(route.variants) - set(models))
            if route.shadow is not None and route.shadow.variant not in models:
                unknown.append(route.shadow.variant)
            if unknown:
                raise ValueError(f"{where}: unknown variant(s) {', '.join(map(repr, unknown))}")
            targets = [*route.variants, *([route.shadow.variant] if route.shadow else [])]
            kinds = {name: models[name].kind for name in targets}
            if len(set(kinds.values())) > 1:
                found = ", ".join(f"{name!r} is {kind}" for name, kind in kinds.items())
                raise ValueError(f"{where}: variants mix model kinds ({found})")
        return self

    def front_door(self) -> FrontDoorConfig:
        """The ingress's own settings; models and routing reach it as user_config."""
        return FrontDoorConfig(
            app_name=self.app_name, route_prefix=self.route_prefix, ingress=self.ingress
        )

    @classmethod
    def assemble(
        cls, front_door: FrontDoorConfig, models: object, routing: object, keys: object = ()
    ) -> GatewayConfig:
        """The config an ingress replica routes with; raises ConfigError when invalid."""
        data = {**front_door.model_dump(), "models": models, "routing": routing, "keys": keys}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, "ingress user_config")) from None

    def model(self, name: str) -> ModelConfig:
        """Returns the model called ``name``; raises KeyError when there is none."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


def parse_config(
    data: object, *, source: str = "config", base_dir: Path | None = None
) -> GatewayConfig:
    """Validates a decoded config; raises ConfigError naming field and reason.

    Relative model directories resolve against ``base_dir`` (default: the
    working directory).
    """
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    base = base_dir if base_dir is not None else Path.cwd()
    return config.model_copy(update={"models": [m.resolved(base) for m in config.models]})


def load_config(path: str | Path, *, base_dir: Path | None = None) -> GatewayConfig:
    """Reads and validates a YAML config file (``base_dir`` as for parse_config)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path), base_dir=base_dir)


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid gateway config ({source}):"]
    for error in exc.errors():
        loc = list(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        engine = _model_engine(loc)
        if error["type"] == "engine":
            loc.append("engine")
        elif engine is not None:
            del loc[2]  # the engine's tag, which the file does not spell
            if error["type"] == "extra_forbidden":
                message = _foreign_setting(str(loc[-1]), engine)
        where = ".".join(str(part) for part in loc)
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def _model_engine(loc: list[str | int]) -> str | None:
    """The engine whose config a ``models.<i>.<engine>...`` error is in, if it is one."""
    if len(loc) > 2 and loc[0] == "models" and loc[2] in ENGINE_CONFIGS:
        return str(loc[2])
    return None


def _foreign_setting(field: str, engine: str) -> str:
    engines = engines_with(field)
    if not engines:
        return f"`{field}` is not a model setting"
    having = engines[0] if len(engines) == 1 else ", ".join(engines[:-1]) + " and " + engines[-1]
    return f"`{field}` is not a setting of {engine} models; only {having} models have it"
