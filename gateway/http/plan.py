"""Where a request goes, decided from its body and headers alone (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import ModelNotFoundError
from gateway.http.endpoints import EndpointSpec
from gateway.http.serving import ServingTable
from gateway.protocol.envelope import ModelEnvelope
from gateway.routing.table import Route

if TYPE_CHECKING:
    from gateway.auth.keys import ApiKey


@dataclass(frozen=True, slots=True)
class Plan:
    """Where a request goes, decided from its body and headers alone:
    ``name`` as the client gave it, the ``route`` to a variant, whether it
    streams, and its routing fields (None when the path names the model)."""

    name: str
    route: Route
    stream: bool
    envelope: ModelEnvelope | None


def plan(
    table: ServingTable,
    spec: EndpointSpec,
    body: dict[str, Any],
    headers: Mapping[str, str],
    key: ApiKey | None,
    path_model: str | None = None,
) -> Plan:
    """The route of a request (no I/O): the model its body (or path) names,
    the variant its cohort (``user`` or ``safety_identifier``, else the cohort header) or chance
    picks. A model the key may not use is answered as one that does not
    exist (404); one of a kind that cannot answer here, 404
    ``model_not_supported``."""
    if path_model is None and spec.name in _MODEL_OPTIONAL and body.get("model") is None:
        # As `vllm serve` takes it: the model served (here, the one LLM the key may use).
        if (sole := _sole_llm(table, key)) is not None:
            body = {**body, "model": sole}
    envelope = spec.routing_fields(body) if path_model is None else None
    name = envelope.model if envelope is not None else str(path_model)
    # An empty value is none (a template's unset variable): no cohort all such requests share.
    cohort = (envelope.cohort if envelope is not None else None) or headers.get(table.cohort_header) or None
    route = table.routes.resolve(name, cohort) if key is None or key.allows(name) else None
    if route is None:
        raise ModelNotFoundError.for_model(name)
    spec.check_kind(name, table.model(route.target).kind)
    stream = spec.streams and bool(getattr(envelope, "stream", False))
    return Plan(name, route, stream, envelope)


# Endpoints whose `model` vLLM's own server makes optional (it serves one).
_MODEL_OPTIONAL = frozenset({"tokenize", "detokenize"})


def _sole_llm(table: ServingTable, key: ApiKey | None) -> str | None:
    """The one LLM ``key`` may use, if there is exactly one."""
    names = [n for n, m in table.models.items() if m.kind == "llm" and (key is None or key.allows(n))]
    return names[0] if len(names) == 1 else None
