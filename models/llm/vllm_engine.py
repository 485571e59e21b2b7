"""vLLM behind the gateway: AsyncLLM plus vLLM's own OpenAI serving layer.

The serving objects are built the way vLLM's ``api_server`` builds them
(``init_app_state``), so chat templates, tools, structured outputs, logprobs,
``n``, usage and stop handling behave exactly as under ``vllm serve``. This
module only adapts: request dicts in, bytes out, vLLM's errors into the
gateway's exception tree.

One deliberate difference from ``vllm serve``: a request whose prompt plus
``max_tokens`` exceeds the context window is refused (400
``context_length_exceeded``, as OpenAI does) instead of having its
``max_tokens`` quietly lowered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from gateway.affinity import engine_core_placement
from gateway.config import lora
from gateway.errors import GatewayError, ModelNotSupportedError
from gateway.protocol.engine import COUNTING
from gateway.protocol.extras import check_fields, check_openai_metadata, counted_fields
from models.llm import budget_checks, cache_salt, compact_json, tool_checks, vllm_compat, vllm_conversation, vllm_errors
from models.llm import long_lists, one_node, vllm_lora, vllm_messages, vllm_stored, vllm_streams
from models.llm.anthropic_keys import check_keys
from models.llm.core_placement import CorePlacer
from models.llm.engine import EngineInfo, body_of, frames_of, input_tokens_body
from models.llm.engine_reaper import EngineReaper, reaper_for_children
from models.llm.format_checks import check_output_schema
from models.llm.message_checks import check_chat_messages
from models.llm.nested_checks import check_nested_keys, check_responses_settings, check_structured_outputs
from models.llm.sampling_checks import (
    ANTHROPIC_RANGES,
    RANGES,
    check_budget_fits,
    check_least_tokens,
    check_sampling,
)
from models.llm.stored import STORED
from models.llm.template_checks import check_request_template
from models.llm.prompt_checks import (
    check_input,
    check_message_content,
    check_not_empty,
    check_prefill,
    check_prompt_ids,
    check_token_ids,
)
from models.log_handlers import handlers_kept

if TYPE_CHECKING:
    from gateway.config import VLLMModelConfig
    from gateway.protocol.engine import EngineRequest
    from models.llm.tally import GenerationTally

logger = logging.getLogger(__name__)
# Set while vLLM renders a Messages count (``count_tokens``): no generation follows.
_ONLY_COUNTED: ContextVar[bool] = ContextVar("only_counted", default=False)


class VLLMEngine:
    """Implements ``models.llm.engine.LLMEngine`` with vLLM's AsyncLLM; every
    use of vLLM's internals goes through ``models.llm.vllm_compat``."""

    def __init__(self, config: VLLMModelConfig) -> None:
        self._config = config
        self._serving: vllm_compat.Serving | None = None
        self._reaper: EngineReaper | None = None
        self._tokenizer_spec: dict[str, Any] | None = None
        self._placer: CorePlacer | None = None
        self._calls_tools = True  # as vLLM's renderer finds once started (vllm_compat.calls_tools)
        self._budgets_thinking = True  # as the engine's reasoning config says once started
        self._largest_token: int | None = None  # the largest token id the model knows, once started
        self._adapters: dict[str, str] = {}  # the LoRA adapters served: name -> source

    @property
    def _vllm(self) -> vllm_compat.Serving:
        assert self._serving is not None, "the engine has not started"
        return self._serving

    def cli_args(self) -> list[str]:
        """The ``vllm serve`` command line this engine is equivalent to."""
        c = self._config
        assert c.model is not None
        args = ["--model", c.model, "--served-model-name", c.name]
        args += ["--dtype", c.dtype, "--seed", str(c.seed)]
        args += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        args += ["--pipeline-parallel-size", str(c.pipeline_parallel_size)]
        if c.workers > 1:
            # Workers go on the bundles of the replica's own placement group.
            args += ["--distributed-executor-backend", "ray"]
        if c.max_model_len is not None:
            args += ["--max-model-len", str(c.max_model_len)]
        if c.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.tool_call_parser is not None:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", c.tool_call_parser]
        if compact_json.is_compact(c):
            args += compact_json.engine_args()
        for key, value in c.engine_args.items():
            if isinstance(value, bool) and "." not in key:  # false: vLLM's --no-<flag> (``vllm_compat.parse_cli_args``)
                args.append(f"--{key}" if value else f"--no-{key}")
            elif isinstance(value, bool):  # a field of a config (``x.y``) takes JSON's true or false
                args += [f"--{key}", "true" if value else "false"]
            else:
                args += [f"--{key}", str(value)]
        return args

    async def start(self) -> None:
        if self._config.kv_cache_space_gib is not None:
            # vLLM's CPU backend reads its KV-cache size only from here.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self._config.kv_cache_space_gib)
        # vLLM's Responses API keeps responses (``store``) only when asked here;
        # the replica bounds how many (``models.llm.stored``).
        os.environ["VLLM_ENABLE_RESPONSES_API_STORE"] = "1" if self._config.kept_responses > 0 else "0"
        if hides_gpus(self._config):
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # (one the gateway inherited names GPUs others hold)
        if (unguarded := one_node.unguarded()) is not None:
            logger.warning("%s: %s", self._config.name, unguarded)
        prepare = compact_json.compact_structural_tag if compact_json.is_compact(self._config) else None
        with handlers_kept():  # vLLM's logging set-up would close Serve's (see models.log_handlers)
            self._serving = await vllm_compat.build_serving(
                self.cli_args(),
                lambda generate, delta_kind: _tallied(generate, delta_kind, prepare, lambda: self._placer),
            )
        # vLLM's processes end with this replica even where Ray's raylet cannot end them (models.llm.engine_reaper).
        self._reaper = reaper_for_children()
        vllm_compat.guard_renders(self._serving, self._check_rendered, self._fits)
        for searching in (self._serving.chat, self._serving.completion):
            vllm_streams.count_beams(searching)
        self._calls_tools = self._serving.chat is None or vllm_compat.calls_tools(self._serving)
        self._budgets_thinking = vllm_compat.budgets_thinking(self._serving)
        self._largest_token = vllm_compat.largest_token_id(self._serving)
        mode = self._config.engine_core_cpus
        if mode != "vllm" and (placement := engine_core_placement(os.getpid())) is not None:
            self._placer = CorePlacer(placement, mode)
            when = "always" if mode == "workers" else "while that measures faster at the load it runs"
            logger.info(
                "%s: vLLM's engine core runs on its workers' CPUs %s %s",
                self._config.name, sorted(placement.workers), when,
            )

    async def set_adapters(self, adapters: Mapping[str, str]) -> dict[str, str]:
        """Serves exactly ``adapters`` (name: directory or hub id) from now on: new
        ones and changed sources load, names no longer given are unloaded (see
        ``models.llm.vllm_lora``). Returns, by name, why vLLM could not load one."""
        load, unload = lora.changes(self._adapters, adapters)
        failed: dict[str, str] = {}
        for name, source in load.items():
            reason = await vllm_lora.load(self._vllm, name, source, replace=name in self._adapters)
            if reason is None:
                self._adapters[name] = source
            else:
                failed[name] = reason
        for name in unload:
            await vllm_lora.unload(self._vllm, name)
            del self._adapters[name]
        if load or unload:
            loaded = sorted(load.keys() - failed.keys())
            logger.info("%s: LoRA adapters loaded %s, unloaded %s", self._config.name, loaded, sorted(unload))
        return failed

    def info(self) -> EngineInfo:
        serving = self._vllm
        if self._tokenizer_spec is None and serving.chat is not None:
            try:
                self._tokenizer_spec = vllm_compat.tokenizer_spec(serving) or {}
            except Exception:  # noqa: BLE001 - the ingress then asks this replica to count
                logger.warning("%s: no tokenizer description for the ingress", self._config.name, exc_info=True)
                self._tokenizer_spec = {}
        return EngineInfo(
            root=self._config.model, max_model_len=serving.max_model_len, tokenizer=self._tokenizer_spec or None
        )

    def num_unfinished_requests(self) -> int:
        return int(self._vllm.engine.get_num_unfinished_requests())

    def metrics_text(self) -> str | None:
        """vLLM's Prometheus metrics (``vllm:*``), as ``vllm serve`` shows them at /metrics."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def check_health(self) -> None:
        await self._vllm.engine.check_health()

    def dead(self) -> bool:
        # AsyncLLM's monitor thread sets this the moment an engine-core process exits.
        return self._serving is not None and bool(self._serving.engine.errored)

    async def shutdown(self) -> None:
        if self._serving is not None:
            self._serving.engine.shutdown()
        if self._reaper is not None:
            self._reaper.close()  # what the engine's shutdown left

    def forget_response(self, response_id: str) -> None:
        vllm_stored.forget_response(self._vllm, response_id)

    async def complete(self, request: EngineRequest, tally: GenerationTally) -> bytes:
        return body_of(await self._answer(request, tally))

    async def stream(self, request: EngineRequest, tally: GenerationTally) -> AsyncIterator[bytes]:
        return frames_of(await self._answer(request, tally))

    async def _answer(self, request: EngineRequest, tally: GenerationTally) -> bytes | AsyncIterator[bytes]:
        """What vLLM answers ``request`` with: a body, or (``stream``) events."""
        if request.endpoint in STORED:
            return await vllm_stored.answer(self._vllm, self._config.name, request, tally)
        if request.endpoint == "responses_input_tokens":
            return input_tokens_body(await self._input_tokens(request))
        token, named = vllm_streams.TALLY.set(tally), vllm_messages.REQUEST_ID.set(request.request_id)
        try:
            parsed, result = await self._served(request, lambda parsed, create: create(parsed, None))
        finally:
            vllm_messages.REQUEST_ID.reset(named)
            vllm_streams.TALLY.reset(token)
        if request.endpoint == "responses" and parsed.background:
            # vLLM generates in a task of its own, begun with this tally set:
            # the tally is complete once that task is done.
            task = tally.continues = vllm_stored.background_task(self._vllm, parsed.request_id)
            if task is not None:
                vllm_stored.mark_failure(self._vllm, parsed.request_id, task)
                vllm_stored.counted(task, tally)
                vllm_stored.in_progress_soon(self._vllm, parsed.request_id, task)  # (once this answer is made)
            # Its events are read from where that task puts them, once it has begun.
            while parsed.stream and task is not None and not task.done():
                if vllm_stored.has_events(self._vllm, parsed.request_id):
                    break
                await asyncio.sleep(0)
            if parsed.stream and vllm_stored.has_events(self._vllm, parsed.request_id):
                result = vllm_stored.background_events(self._vllm, parsed.request_id)
        if hasattr(result, "model_dump_json"):
            if getattr(parsed, "use_beam_search", False) and getattr(result, "usage", None) is not None:
                # vLLM searches beams by one engine request per beam and step, each
                # with its prompt so far: counted as the answer's usage, not their sum.
                tally.prompt_tokens = int(result.usage.prompt_tokens)
                tally.completion_tokens = int(result.usage.completion_tokens or 0)
                tally.cached_tokens = 0
            if request.endpoint == "messages" and vllm_messages.thinking_omitted(request.body):
                vllm_messages.omit_thinking(result)
            return vllm_compat.body_json(result, request.endpoint)
        if request.endpoint == "responses":
            # A background response's id comes at once: the client may cancel it.
            return vllm_streams.events(result, tally, hold=not parsed.background)
        if request.endpoint == "messages":
            omitted = vllm_messages.thinking_omitted(request.body)
            return vllm_streams.named_events(result, tally, vllm_messages.thinking_text if omitted else None)
        return vllm_streams.frames(result, self.dead, tally)

    async def _served(
        self, request: EngineRequest, call: Callable[[Any, Any], Awaitable[Any]]
    ) -> tuple[Any, Any]:
        """Validates ``request`` with vLLM's schema and awaits ``call(parsed,
        create)``; vLLM's errors come back as GatewayError. Returns the parsed
        request and the result."""
        serving = self._vllm
        endpoint = serving.endpoints.get(_schema_key(request))
        if endpoint is None:
            raise ModelNotSupportedError(
                f"The model `{self._config.name}` does not serve this endpoint.", param="model"
            )
        schema, create, prompt_param = endpoint
        # vLLM's schemas take fields they do not know and drop them.
        check_fields(request.endpoint, request.body, counted_fields(request.endpoint, _known_fields(schema)))
        try:
            self._check_body(request, prompt_param)
        except GatewayError:
            raise
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            # A field of the wrong JSON type (an unhashable tool name, a list
            # for an id): vLLM's schema names it, in the validation below.
            logger.debug("request %s: body checks skipped: %r", request.request_id, exc)
        try:
            body = _with_request_id(request)
            await long_lists.screen(lambda part: vllm_errors.validated(schema, part), body)
            parsed = vllm_errors.validated(schema, body)
            if request.endpoint in ("chat", "completion"):
                check_nested_keys(request.body, parsed)
            if request.endpoint in budget_checks.GENERATING:
                cache_salt.salt(parsed, request.owner)
                budget_checks.check_thinking(request.endpoint, parsed, self._config.name, self._budgets_thinking)
                budget_checks.check_budget(request.endpoint, parsed)
                budget_checks.check_logprobs(request.endpoint, parsed, int(serving.model_config.max_logprobs))
                check_budget_fits(*budget_checks.budget_field(request.endpoint, parsed), serving.max_model_len)
                ranges = ANTHROPIC_RANGES if request.endpoint == "messages" else RANGES
                check_sampling(parsed, budget_checks.budget(request.endpoint, parsed), ranges)
                tool_checks.check_tool_calls(
                    request.endpoint, request.body, parsed, self._config.name, self._calls_tools
                )
                if request.endpoint == "completion":
                    check_prompt_ids(parsed.prompt, self._largest_token)
            elif request.endpoint == "messages_count":
                tool_checks.check_tool_calls(
                    request.endpoint, request.body, parsed, self._config.name, self._calls_tools
                )
            elif request.endpoint == "detokenize":
                check_token_ids(parsed.tokens, self._largest_token)
            counting = _ONLY_COUNTED.set(request.endpoint == "messages_count")
            try:
                result = await call(parsed, create)
            finally:
                _ONLY_COUNTED.reset(counting)
        except Exception as exc:  # vLLM signals client mistakes with exceptions too
            raise vllm_errors.map_exception(exc, prompt_param) from None
        if isinstance(result, serving.error_response):
            raise vllm_errors.map_error(result.model_dump(), prompt_param)
        return parsed, result

    def _check_body(self, request: EngineRequest, prompt_param: str) -> None:
        """Refuses, naming the field, what vLLM's schema would take and OpenAI's
        or Anthropic's API refuses (see each check's module)."""
        body, endpoint, serving = request.body, request.endpoint, self._vllm
        check_openai_metadata(endpoint, body)
        check_request_template(body)
        tool_checks.check_tool_schemas(endpoint, body)
        check_output_schema(endpoint, body)
        if prompt_param == "messages" or endpoint == "completion":
            check_not_empty(body, prompt_param)
        if endpoint in ("chat", "tokenize"):
            check_chat_messages(body)
        if endpoint in ("chat", "completion"):
            check_structured_outputs(body)
        elif prompt_param == "input":
            check_input(body)
        if endpoint in ("responses", "responses_input_tokens") and serving.responses is not None:
            vllm_stored.check_previous(serving, body.get("previous_response_id"))
            vllm_conversation.check_call_outputs(serving.responses, body)
            if serving.responses.tool_server is None:
                tool_checks.check_builtin_tools(body, self._config.name)
            check_responses_settings(body, serving.responses.tool_server is not None)
            tool_checks.check_named_choice(body)
        if endpoint in ("messages", "messages_count"):
            tool_checks.check_anthropic_tools(body)
            check_keys(body)
            check_message_content(body)
            check_prefill(body)  # (counted as it would be generated: not at all)

    async def _input_tokens(self, request: EngineRequest) -> int:
        """The tokens of a Responses request's prompt, with its previous
        response's conversation, as vLLM renders it to generate."""
        serving = self._vllm

        async def counted(parsed: Any, create: Any) -> int:
            return vllm_compat.prompt_len(serving, await vllm_compat.render_response(serving, parsed))

        return (await self._served(request, counted))[1]

    async def most_tokens(self, request: EngineRequest) -> int:
        """Renders the request as vLLM will (chat template, tokenizer) without
        generating: each prompt's tokens plus ``n`` times its output budget
        (``max_completion_tokens`` / ``max_tokens``; Responses:
        ``max_output_tokens``), else the rest of the window)."""
        if request.endpoint in COUNTING:
            return 0
        serving = self._vllm

        async def rendered(parsed: Any, create: Any) -> list[Any]:
            if request.endpoint == "responses":
                return [await vllm_compat.render_response(serving, parsed)]
            return await vllm_compat.render(serving, request.endpoint, parsed)

        parsed, inputs = await self._served(request, rendered)
        budget = budget_checks.budget(request.endpoint, parsed)
        choices = getattr(parsed, "n", None) or 1
        total = 0
        for engine_input in inputs:
            prompt = vllm_compat.prompt_len(serving, engine_input)
            total += prompt + choices * (budget if budget is not None else serving.max_model_len - prompt)
        return total

    def _fits(self, request: Any, engine_input: Any) -> bool:
        """Whether a (vLLM-parsed) Responses request's rendered prompt leaves its
        output budget in the context window (at least one token without one)."""
        budget = budget_checks.budget("responses", request)
        return vllm_compat.prompt_len(self._vllm, engine_input) + (budget or 1) <= self._vllm.max_model_len

    def _check_rendered(self, endpoint: str, request: Any, inputs: list[Any]) -> None:
        """Refuses prompt + budget beyond the context window, and where no
        budget was sent a ``min_tokens`` beyond the window's rest, as vLLM
        renders each request to generate (so streams fail before their first byte).
        A prompt only counted (``count_tokens``) is counted up to the window
        itself, as vLLM counts it: the client asks whether it fits."""
        if _ONLY_COUNTED.get():
            return
        budget, limit = budget_checks.budget(endpoint, request), self._vllm.max_model_len
        param = {"completion": "prompt", "responses": "input"}.get(endpoint, "messages")
        for engine_input in inputs:
            prompt = vllm_compat.prompt_len(self._vllm, engine_input)
            if budget is None and prompt < limit:
                # vLLM fills the window's rest and refused a min_tokens above it naming no field.
                check_least_tokens(request, limit - prompt)
            budget_checks.check_window(prompt, budget, limit, param)


def _tallied(
    generate: Callable[..., AsyncIterator[Any]],
    delta_kind: Any,
    prepare: Callable[[Any], None] | None = None,
    placer: Callable[[], CorePlacer | None] = lambda: None,
) -> Callable[..., AsyncIterator[Any]]:
    """``AsyncLLM.generate``, counting into the tally of the request being served;
    ``delta_kind`` is vLLM's ``RequestOutputKind.DELTA``; ``prepare``, when given,
    may adjust each request's sampling params before the engine sees them;
    ``placer``'s result, when one, learns when each request generates."""

    def generate_and_count(prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        if prepare is not None:
            prepare(sampling_params)
        outputs = generate(prompt, sampling_params, *args, **kwargs)
        tally = vllm_streams.TALLY.get()
        if tally is None:
            return outputs
        delta = getattr(sampling_params, "output_kind", None) == delta_kind
        request_id = kwargs.get("request_id", args[0] if args else None)
        engine = getattr(generate, "__self__", None)
        used = (lambda: _used(engine, request_id)) if engine is not None and request_id is not None else None
        return vllm_streams.count(outputs, tally, delta, placer(), used)

    return generate_and_count


def hides_gpus(config: VLLMModelConfig) -> bool:
    """Whether ``config``'s replica hides every GPU from vLLM: one worker given
    none (Ray 2.60 hides none from an actor given none, and vLLM would take
    the node's first, which Ray may have given another replica)."""
    return config.workers == 1 and config.num_gpus == 0


def _used(engine: Any, request_id: str) -> tuple[int, int] | None:
    """The prompt and the tokens generated so far of the engine's request
    ``request_id`` (its ``n`` choices' together), None once it is unknown there.
    A choice that has ended is no longer among the request's states: its
    output waits in its parent's aggregate (a non-streaming ``n`` > 1)."""
    try:
        processor = engine.output_processor
        states = [processor.request_states.get(internal) for internal in processor.external_req_ids.get(request_id, ())]
        states = [state for state in states if state is not None]
        if not states:
            return None
        generated = sum(state.detokenizer.num_output_tokens() for state in states if state.detokenizer is not None)
        parents = {id(parent): parent for state in states if (parent := getattr(state, "parent_req", None)) is not None}
        ended = [output for parent in parents.values() for output in parent.output_aggregator if output is not None]
        generated += sum(len(output.token_ids) for output in ended)
        return max(int(state.prompt_len or 0) for state in states), generated
    except (AttributeError, TypeError):  # (another vLLM's internals: counted as before, from outputs)
        return None


_KNOWN_FIELDS: dict[type, frozenset[str]] = {}


def _known_fields(schema: type) -> frozenset[str]:
    """The body fields a vLLM request schema reads: its fields' names and aliases."""
    known = _KNOWN_FIELDS.get(schema)
    if known is None:
        fields = schema.model_fields  # type: ignore[attr-defined]
        known = _KNOWN_FIELDS[schema] = frozenset(
            {*fields, *(field.alias for field in fields.values() if field.alias)}
        )
    return known


def _schema_key(request: EngineRequest) -> str:
    """Which of ``Serving.endpoints`` validates and answers ``request``: the
    endpoint, but ``/tokenize`` of chat messages has a schema of its own."""
    if request.endpoint == "tokenize" and "messages" in request.body:
        return vllm_compat.TOKENIZE_CHAT
    return request.endpoint


def _with_request_id(request: EngineRequest) -> dict[str, Any]:
    """The body with vLLM's ``request_id`` (its engine request's id, and the
    base of chunk, completion and response ids): always the gateway's request
    id, which the ingress took from the body's own ``request_id`` when the
    client sent no ``x-request-id``. For the Responses API it is also the
    response's ``id``, so it gets OpenAI's ``resp_`` prefix. A completion's
    ``n: null`` and a chat's ``tool_choice: null`` are left out."""
    if request.endpoint == "responses":
        return {**request.body, "request_id": f"resp_{request.request_id}"}
    if request.endpoint in ("tokenize", "detokenize"):
        # No engine request, and vLLM's schemas would log an unknown field (``user``: routed by).
        return {key: value for key, value in request.body.items() if key != "user"}
    body = {**request.body, "request_id": request.request_id}
    if request.endpoint == "completion" and "n" in body and body["n"] is None:
        del body["n"]  # not set, as OpenAI takes null; vLLM's completion schema refused it
    if request.endpoint == "chat" and "tool_choice" in body and body["tool_choice"] is None:
        # Not set, as OpenAI takes null ("auto" with tools): vLLM parsed the
        # calls out of a whole answer as for "auto", then answered without them.
        del body["tool_choice"]
    return body
