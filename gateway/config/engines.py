"""Each engine's model config (vLLM, echo, scikit-learn, sentence-transformers),
and a config file's model entry read as the config of the engine it names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from gateway.config import lora
from gateway.config.base import ConfigError, ModelName, user_path
from gateway.config.models import (
    DEFAULT_STORED_RESPONSES,
    ENGINE_KINDS,
    STRUCTURED_OUTPUTS_ARG,
    EMBEDDING_DTYPES,
    ModelConfig,
    PlacementStrategy,
)


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
        "(vLLM's workers take exactly one; the echo engine's may take 0 on CPU-only clusters).",
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
        "past it the oldest stored is dropped, or a key's own oldest where it keeps more than half "
        "(one still generating is never). They live in the replica's memory: gone when it "
        f"stops. 0 keeps none. Unset: {DEFAULT_STORED_RESPONSES}.",
    )

    @model_validator(mode="after")
    def _workers_take_bundles(self) -> LLMModelConfig:
        if self.workers > 1 and self.num_gpus > 0:
            raise ValueError(
                "`num_gpus` is for single-worker replicas; a replica with "
                f"{self.workers} workers takes `gpus_per_worker` in each worker's bundle"
            )
        if self.workers > 1 and self.gpus_per_worker == 0 and self.cpus_per_worker == 0:
            raise ValueError("each worker's bundle needs some resource: `cpus_per_worker` or `gpus_per_worker` above 0")
        if self.autoscaling is not None and self.autoscaling.min_replicas == 0:
            # Its requests go by a running replica's relay port: none would ever ask Serve for one.
            raise ValueError("an LLM model does not scale to zero: `autoscaling.min_replicas` must be at least 1")
        return self

    @property
    def workers(self) -> int:
        """Engine workers per replica: tensor x pipeline parallel size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def kept_responses(self) -> int:
        """Stored responses each replica keeps (``stored_responses``, or its default)."""
        return DEFAULT_STORED_RESPONSES if self.stored_responses is None else self.stored_responses


# A vLLM flag's name, or a name and a field of its config (``speculative_config.method``).
FLAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z0-9_.-]+)?")

# vLLM engine arguments the gateway sets from a model's own fields (``VLLMEngine.cli_args``), by the field.
GATEWAY_ENGINE_ARGS = {
    "model": "model",
    "served-model-name": "name",
    "dtype": "dtype",
    "seed": "seed",
    "tensor-parallel-size": "tensor_parallel_size",
    "pipeline-parallel-size": "pipeline_parallel_size",
    "distributed-executor-backend": "tensor_parallel_size",
    "max-model-len": "max_model_len",
    "gpu-memory-utilization": "gpu_memory_utilization",
    "tool-call-parser": "tool_call_parser",
    "enable-auto-tool-choice": "tool_call_parser",
}

# vLLM's share of a GPU's memory where `gpu_memory_utilization` is unset.
VLLM_GPU_MEMORY_UTILIZATION = 0.92
# Of a shared GPU's memory, what a replica leaves out of its vLLM share for its CUDA context.
GPU_CONTEXT_SHARE = 0.05

# vLLM engine arguments that change how many workers an engine starts, or on
# which nodes: the gateway reserves a replica's workers (tensor x pipeline
# parallel size, one node) before vLLM starts them.
PLACEMENT_ENGINE_ARGS = frozenset(
    {"prefill-context-parallel-size", "nnodes", "node-rank", "master-addr", "master-port"}
)

# Settings of vLLM's own HTTP server (`vllm serve`), which the gateway does not
# run: its parser takes them, and they would do nothing. `config` reads more
# arguments from a file, past the checks here.
SERVER_ENGINE_ARGS = frozenset({
    "config", "headless", "api-server-count", "grpc", "grpc-port", "host", "port", "uds", "root-path",
    "api-key", "allowed-origins", "allowed-methods", "allowed-headers", "allow-credentials", "ssl-keyfile",
    "ssl-certfile", "ssl-ca-certs", "ssl-cert-reqs", "ssl-ciphers", "enable-ssl-refresh", "middleware",
    "uvicorn-log-level", "disable-uvicorn-access-log", "disable-access-log-for-endpoints", "disable-fastapi-docs",
    "enable-offline-docs", "enable-request-id-headers", "h11-max-header-count", "h11-max-incomplete-event-size",
    "data-parallel-supervisor-port", "dp-supervisor-probe-failure-threshold", "dp-supervisor-probe-interval-s",
    "dp-supervisor-probe-timeout-s",
})  # fmt: skip

# Other names vLLM's parser takes for a flag the gateway checks.
VLLM_ALIASES = {"device-memory-utilization": "gpu-memory-utilization"}


def _flag_of(key: str, value: object) -> str:
    """The vLLM flag an ``engine_args`` key sets, whichever of its names it
    was given by (``no-enable-lora: true`` sets ``enable-lora``)."""
    flag = key.removeprefix("no-") if isinstance(value, bool) else key
    return VLLM_ALIASES.get(flag, flag)


def _set_to(engine_args: dict[str, str | int | float | bool], flag: str) -> object:
    """What ``engine_args`` set ``flag`` to (None: left unset), by any of its names."""
    for key, value in engine_args.items():
        if _flag_of(key, value) == flag:
            return (not value) if key.startswith("no-") and isinstance(value, bool) else value
    return None


def places_workers(key: str) -> bool:
    """Whether the ``engine_args`` key ``key`` changes an engine's workers or their nodes."""
    return key in PLACEMENT_ENGINE_ARGS or key.removeprefix("no-").startswith("data-parallel")


class VLLMModelConfig(LLMModelConfig):
    """A model served by a real vLLM engine."""

    engine: Literal["vllm"] = "vllm"
    dtype: str = Field("auto", description="Weights and activations dtype, passed to vLLM.")
    seed: int = Field(0, description="Engine seed for requests that set none.")
    kv_cache_space_gib: int | None = Field(
        None,
        ge=1,
        description="KV-cache size in whole GiB on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU. "
        "Unset on CPU, vLLM reserves `gpu_memory_utilization` (0.92) of the memory, which must be free.",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory vLLM may take; on CPU, without "
        "`kv_cache_space_gib`, the share of memory it reserves."
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
    engine_core_cpus: Literal["auto", "workers", "vllm"] = Field(
        "auto",
        description="Where vLLM's engine-core process (its scheduler) runs on a host without "
        "a GPU, where vLLM binds its workers to all CPUs but one. `workers`: on the workers' "
        "CPUs, since the one left over also runs the gateway's own processes, behind which "
        "the scheduler would queue while its workers wait for it (on 2 vCPUs: 1.5-1.8x the "
        "tokens/s at 32 streams). `vllm`: where vLLM leaves it, free to run on every CPU "
        "(faster for a single request: about 1.2x its tokens/s). `auto` (default): where vLLM "
        "leaves it while one request generates; with more, in whichever of the two places "
        "made tokens faster at that load, measured in half-second windows and re-checked "
        "one window in eight (which wins from how many streams on differs between hosts). "
        "On other hosts it stays where vLLM leaves it.",
    )
    engine_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments by their CLI name without `--` "
        "(e.g. `enable-prefix-caching: true`; `false` passes vLLM's `--no-` form where it has one); "
        "checked by vLLM's parser at start-up. Those the gateway sets from the model's own "
        "fields (`model`, `dtype`, `max-model-len`, ...) and settings of vLLM's own HTTP server "
        "(`api-key`, `port`, `config`, ...) are refused here.",
    )
    lora_adapters: dict[ModelName, str] = Field(
        default_factory=dict,
        description="LoRA adapters of this model, served by its replicas as models of their own: "
        "the name clients send as `model` (routable, A/B-able and key-scoped like any model) and "
        "the adapter's directory (PEFT's `adapter_config.json` and weights) or hub id. The engine "
        "starts with a rank limit from the adapters' own `r` and a batch's adapter slots for all of "
        "them (their number rounded up to a power of two), unless `engine_args` sets `max-lora-rank` "
        "/ `max-loras`; a change that keeps both is live (running replicas load and unload adapters), "
        "any other restarts the replicas (with `enable-lora` and both set there, even the first "
        "adapter and the last are live).",
    )

    @field_validator("engine_args")
    @classmethod
    def _dashed(cls, engine_args: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
        """The arguments under vLLM's dashed names, as vLLM's parser reads
        ``max_loras`` too: the gateway's own checks and settings then see
        the argument whichever way it was written. As in vLLM's parser, only
        the name before a dot is dashed: ``speculative_config.num_speculative_tokens``
        names a field of a config, which keeps its own spelling."""
        dashed: dict[str, str | int | float | bool] = {}
        given: dict[str, str] = {}  # each dashed name's key as written
        for key, value in engine_args.items():
            if not FLAG_NAME.fullmatch(key):
                # ``max-model-len=77`` is read by vLLM's parser as that flag, past the checks below.
                raise ValueError(f"`engine_args` key {key!r} is no vLLM flag name")
            flag, dot, field = key.partition(".")
            name = flag.replace("_", "-") + dot + field
            if name in dashed:
                raise ValueError(f"`engine_args` sets {name!r} twice (as {given[name]!r} and {key!r})")
            dashed[name], given[name] = value, key
        return dashed

    @model_validator(mode="after")
    def _one_gpu_a_worker(self) -> VLLMModelConfig:
        if self.workers == 1 and self.num_gpus > 1:
            raise ValueError(
                f"`num_gpus: {self.num_gpus:g}`: a vLLM replica of one worker uses one GPU; for "
                "more, set `tensor_parallel_size` (each worker then takes `gpus_per_worker`)"
            )
        share = VLLM_GPU_MEMORY_UTILIZATION if self.gpu_memory_utilization is None else self.gpu_memory_utilization
        most = round(self.num_gpus - GPU_CONTEXT_SHARE, 4)
        if 0 < self.num_gpus < 1 and most <= 0:
            raise ValueError(
                f"`num_gpus: {self.num_gpus:g}` leaves vLLM no memory beside its CUDA context: "
                f"share a GPU in parts above {GPU_CONTEXT_SHARE:g}"
            )
        if 0 < self.num_gpus < 1 and share > most:
            # Ray would place another replica on the same GPU, whose engine then finds too little memory
            # free (vLLM wants its whole share free at start, beside the other's share and CUDA context).
            raise ValueError(
                f"`num_gpus: {self.num_gpus:g}` shares a GPU, but vLLM takes {share:g} of its memory: "
                f"set `gpu_memory_utilization` to at most {most:g} (its share, less room for each "
                "process's CUDA context)"
            )
        return self

    @model_validator(mode="after")
    def _one_whitespace_setting(self) -> VLLMModelConfig:
        for key, value in self.engine_args.items():
            field = GATEWAY_ENGINE_ARGS.get(_flag_of(key, value))
            if field is not None:
                # vLLM takes the last of a flag given twice: the engine would
                # run otherwise than the gateway routes, places and describes it.
                raise ValueError(f"`engine_args.{key}` is the gateway's to set: use the model's `{field}`")
            if _flag_of(key, value) in SERVER_ENGINE_ARGS:
                raise ValueError(
                    f"`engine_args.{key}` is a setting of vLLM's own HTTP server (`vllm serve`), which the "
                    "gateway does not run: clients reach the engine only through the gateway's front door, "
                    "configured under `ingress` and `keys`"
                )
            if key == "kv-cache-memory-bytes" and self.kv_cache_space_gib is not None and self.num_gpus == 0:
                # On CPU vLLM takes VLLM_CPU_KVCACHE_SPACE over it, without a word.
                raise ValueError("set either `kv_cache_space_gib` or `engine_args.kv-cache-memory-bytes`, not both")
            if places_workers(key):
                # Reserved as tensor x pipeline parallel workers on one node, they
                # would start more (or elsewhere), past what Ray reserved for them.
                raise ValueError(
                    f"`engine_args.{key}` changes how many workers vLLM starts, or where; the gateway "
                    "places a replica's workers by `tensor_parallel_size` and `pipeline_parallel_size` "
                    "on one node: for data parallelism, run more replicas (`num_replicas`)"
                )
        if self.json_whitespace is not None and self.brings_structured_outputs:
            raise ValueError(
                f"set either `json_whitespace` or `engine_args.{STRUCTURED_OUTPUTS_ARG}`, not both"
            )
        if self.name in self.lora_adapters:
            raise ValueError(f"the LoRA adapter {self.name!r} has the name of its own model")
        if self.lora_adapters and "lora-modules" in self.engine_args:
            raise ValueError("`lora_adapters` sets vLLM's `lora-modules`; leave it out of `engine_args`")
        if self.lora_adapters and _set_to(self.engine_args, "enable-lora") is False:
            raise ValueError("`lora_adapters` needs vLLM's `enable-lora`; leave it out of `engine_args` or set it true")
        if self.workers > 1 and self.gpus_per_worker != 1:
            # vLLM's Ray workers each take a whole GPU (VLLM_RAY_PER_WORKER_GPUS), which a
            # smaller bundle never holds; its CPU backend runs no Ray workers at all.
            raise ValueError(
                f"a vLLM replica with {self.workers} workers needs `gpus_per_worker: 1` (got "
                f"{self.gpus_per_worker:g}): each of vLLM's workers takes one whole GPU, and vLLM "
                "runs several workers only on GPUs; on CPU serve tensor_parallel_size 1 and "
                "pipeline_parallel_size 1 with more replicas"
            )
        return self

    @property
    def brings_structured_outputs(self) -> bool:
        """Whether ``engine_args`` set vLLM's structured-output settings, whole or a field of them."""
        prefix = STRUCTURED_OUTPUTS_ARG + "."
        return any(key == STRUCTURED_OUTPUTS_ARG or key.startswith(prefix) for key in self.engine_args)

    def deployment_args(self) -> dict[str, object]:
        """Without the adapters, which reach running replicas live (``replica_user_config``):
        in their place, the engine settings they need, so that only a change to those
        restarts the replicas."""
        args = super().deployment_args()
        del args["lora_adapters"]
        args["engine_args"] = {**lora.engine_settings(self.lora_adapters, self.engine_args), **self.engine_args}
        return args

    def replica_user_config(self) -> dict[str, object]:
        """What a running replica reconfigures itself from: the adapters it serves."""
        return {"lora_adapters": dict(self.lora_adapters)}

    def resolved(self, base_dir: Path) -> VLLMModelConfig:
        """Also the adapters' local directories made absolute (hub ids stay as given)."""
        model = super().resolved(base_dir)
        adapters: dict[str, str] = {}
        for name, source in self.lora_adapters.items():
            path = base_dir / user_path(source, f"models[{self.name}].lora_adapters.{name}")
            if (path / "adapter_config.json").is_file():
                adapters[name] = str(path.resolve())
            elif path.exists() or source.startswith((".", "/", "~")):
                raise ConfigError(
                    f"models[{self.name}].lora_adapters.{name}: no adapter_config.json in {str(path)!r}"
                )
            else:
                adapters[name] = source
        return model.model_copy(update={"lora_adapters": adapters})  # type: ignore[return-value]


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
