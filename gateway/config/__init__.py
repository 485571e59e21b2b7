"""The gateway's configuration: a YAML file validated once, when the app is built.

Every field has a description; an invalid file fails start-up with
:class:`ConfigError` naming the field and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.config.base import ConfigError, ModelName, StrictConfig, user_path
from gateway.config.engines import (
    ENGINE_CONFIGS,
    AnyModelConfig,
    ClassicalModelConfig,
    EchoModelConfig,
    EmbeddingModelConfig,
    LLMModelConfig,
    SklearnModelConfig,
    VLLMModelConfig,
    engines_with,
    parse_model,
)
from gateway.config.front_door import (
    ROUTE_PREFIX,
    ROUTE_PREFIX_DESCRIPTION,
    CorsConfig,
    FrontDoorConfig,
    IngressConfig,
)
from gateway.config.keys import KEY_HASH_PATTERN, KeyConfig
from gateway.config.models import (
    DEFAULT_STORED_RESPONSES,
    ENGINE_KINDS,
    LIVE_MODEL_FIELDS,
    STRUCTURED_OUTPUTS_ARG,
    AutoscalingConfig,
    Engine,
    ModelConfig,
    ModelKind,
)
from gateway.config.routing import RouteConfig, RoutingConfig, ShadowConfig
from gateway.config.runtime import RuntimeConfig

__all__ = [
    "DEFAULT_STORED_RESPONSES",
    "ENGINE_CONFIGS",
    "ENGINE_KINDS",
    "KEY_HASH_PATTERN",
    "LIVE_MODEL_FIELDS",
    "STRUCTURED_OUTPUTS_ARG",
    "AnyModelConfig",
    "AutoscalingConfig",
    "ClassicalModelConfig",
    "ConfigError",
    "CorsConfig",
    "EchoModelConfig",
    "EmbeddingModelConfig",
    "Engine",
    "FrontDoorConfig",
    "GatewayConfig",
    "IngressConfig",
    "KeyConfig",
    "LLMModelConfig",
    "ModelConfig",
    "ModelKind",
    "ModelName",
    "RouteConfig",
    "RoutingConfig",
    "RuntimeConfig",
    "ShadowConfig",
    "SklearnModelConfig",
    "VLLMModelConfig",
    "engines_with",
    "load_config",
    "parse_config",
    "parse_model",
]

class GatewayConfig(StrictConfig):
    """The whole gateway: the models it serves and its front door."""

    app_name: str = Field("llm-gateway", min_length=1, description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=ROUTE_PREFIX, description=ROUTE_PREFIX_DESCRIPTION)
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
        for model in models:
            for adapter in getattr(model, "lora_adapters", {}):
                if adapter in seen:
                    raise ValueError(f"the LoRA adapter {adapter!r} of {model.name!r} has the name of another model")
                seen.add(adapter)
        return models

    def adapters(self) -> dict[str, ModelConfig]:
        """Each LoRA adapter's name and the model whose replicas serve it."""
        return {adapter: m for m in self.models for adapter in getattr(m, "lora_adapters", {})}

    def served(self) -> dict[str, ModelConfig]:
        """Every name a request may send that is not an alias: the models,
        and their LoRA adapters (each with the model that serves it)."""
        return {**{m.name: m for m in self.models}, **self.adapters()}

    @model_validator(mode="after")
    def _routes_name_served_models(self) -> GatewayConfig:
        models = self.served()
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

    @model_validator(mode="after")
    def _reachable_targets(self) -> GatewayConfig:
        """A classical model's autoscaling target one replica's load can pass:
        Serve counts at most ``max_ongoing_requests`` on it and
        ``max_queued_requests`` waiting at each ingress replica (its bound is
        each caller's); requests past them are refused, never counted. (An
        LLM's bound is its replicas' own: ``ModelConfig``.)"""
        for index, model in enumerate(self.models):
            if model.kind == "llm" or model.autoscaling is None or model.max_queued_requests < 1:
                continue
            most = model.max_ongoing_requests + self.ingress.num_replicas * model.max_queued_requests
            if model.autoscaling.target_ongoing_requests >= most:
                raise ValueError(
                    f"models[{index}] ({model.name!r}): `autoscaling.target_ongoing_requests` "
                    f"({model.autoscaling.target_ongoing_requests:g}) must be below what one replica's load can "
                    f"reach (`max_ongoing_requests` + `ingress.num_replicas` × `max_queued_requests` = {most}): "
                    "the load could never ask for another replica"
                )
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
    data: object, *, source: str = "config", base_dir: Path | None = None, paths: bool = True
) -> GatewayConfig:
    """Validates a decoded config; raises ConfigError naming field and reason.

    Relative model directories and access log files resolve against
    ``base_dir`` (default: the working directory); ``~`` is expanded in both.
    ``paths=False`` leaves them as written, unchecked: for a reader of other
    sections on a machine that may not hold the models.
    """
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if not paths:
        return config
    base = base_dir if base_dir is not None else Path.cwd()
    update: dict[str, object] = {"models": [m.resolved(base) for m in config.models]}
    if config.ingress.access_log not in ("stderr", "off"):
        # The ingress replicas open it from their own working directory, and
        # ``~`` means nothing to ``open``.
        log = os.path.abspath(base / user_path(config.ingress.access_log, "ingress.access_log"))
        update["ingress"] = config.ingress.model_copy(update={"access_log": log})
    return config.model_copy(update=update)


def load_config(path: str | Path, *, base_dir: Path | None = None, paths: bool = True) -> GatewayConfig:
    """Reads and validates a YAML config file (``base_dir`` and ``paths`` as for parse_config)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path), base_dir=base_dir, paths=paths)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: the
    last would win unseen (``variants: {a: 80, a: 20}`` weighs 20, a second
    ``models:`` replaces the first list)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        own = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
        seen: set[object] = set()
        for key_node in own:  # (keys a merge (`<<: *base`) brings may be set again: that is what it is for)
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
