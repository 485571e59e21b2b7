"""What every served model has, whatever its engine: its name, its weights,
its deployment (replicas, resources, queueing, timeouts)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gateway.config.base import ConfigError, ModelName, StrictConfig, user_path

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
# nothing (but a switch between `num_replicas` and `autoscaling`, which Serve
# counts in the code version: ``gateway.deploy``).
LIVE_MODEL_FIELDS = frozenset(
    {"num_replicas", "autoscaling", "max_batch_size", "batch_wait_timeout_s"}
)


class AutoscalingConfig(StrictConfig):
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


class ModelConfig(StrictConfig):
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
        "[DONE]). A background response (Responses API) is bounded only until it starts. None: no limit.",
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
        capacity = self.max_ongoing_requests + self.max_queued_requests
        target = self.autoscaling.target_ongoing_requests if self.autoscaling is not None else 0
        if self.kind == "llm" and self.max_queued_requests > 0 and target >= capacity:
            # An LLM replica refuses requests past its capacity, never counting them: its load stays at
            # the target at most. (A classical model's queue bound is each ingress replica's, in Serve.)
            raise ValueError(
                f"`autoscaling.target_ongoing_requests` ({target:g}) must be below "
                f"what one replica takes (`max_ongoing_requests` + `max_queued_requests` = {capacity}): "
                "the load could never ask for another replica"
            )
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
        path = base_dir / user_path(self.model, f"models[{self.name}].model")
        if path.exists():
            return self.model_copy(update={"model": str(path.resolve())})
        if self.engine == "sklearn" or self.model.startswith((".", "/", "~")):
            raise ConfigError(
                f"models[{self.name}].model: {self.model!r} does not exist "
                "(run `llm-gateway build-model` for the local models)"
            )
        return self
