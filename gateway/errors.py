"""The gateway's exception tree; each class knows its HTTP status and OpenAI shape.

::

    GatewayError                      500 server_error
    ├── InvalidRequestError           400 invalid_request_error
    │   ├── ContextLengthExceededError    400 code=context_length_exceeded
    │   ├── RequestTooLargeError          413 code=request_too_large
    │   ├── UnsupportedEncodingError      415 code=unsupported_content_encoding
    │   └── RequestReadTimeoutError       408 code=request_read_timeout
    ├── AuthenticationError           401 invalid_request_error  code=invalid_api_key
    ├── NotFoundError                 404 invalid_request_error  code=not_found
    │   ├── ModelNotFoundError            404 code=model_not_found
    │   ├── ModelNotSupportedError        404 code=model_not_supported
    │   └── ResponseNotFoundError         404 code=response_not_found
    ├── MethodNotAllowedError         405 invalid_request_error  code=method_not_allowed
    ├── RateLimitError                429 requests|tokens        code=rate_limit_exceeded
    ├── NotImplementedFeatureError    400 invalid_request_error  code=not_implemented
    ├── ServiceUnavailableError       503 service_unavailable    (Retry-After)
    │   └── OverloadedError               503 or 429 code=overloaded
    └── InternalServerError           500 server_error

Raised anywhere (ingress or model replica: they pickle across Ray handles),
turned into ``{"error": {"message", "type", "param", "code"}}`` in one place
(on the Messages API's routes: Anthropic's ``{"type": "error", "error":
{"type", "message"}}``, its types chosen by status).
Messages never contain tracebacks or file paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pydantic import ValidationError


class GatewayError(Exception):
    """Base class: an error a client receives in the OpenAI error envelope."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.status_code = status if status is not None else self.status
        self.retry_after_s = retry_after_s
        # Set where the error is answered (e.g. the variant that was chosen).
        self.extra_headers: dict[str, str] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling.
        return (
            _rebuild,
            (type(self), self.message, self.param, self.code, self.status_code, self.retry_after_s),
        )

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error envelope."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_anthropic(self) -> dict[str, Any]:
        """Anthropic's error envelope (the Messages API's routes): its error
        types by status, the same message."""
        return {"type": "error", "error": {"type": self.anthropic_type(), "message": self.message}}

    def to_inference(self) -> dict[str, Any]:
        """The Open Inference Protocol's error (``/v2`` routes): ``{"error":
        <message>}``, the shape tritonclient and KServe's clients read."""
        return {"error": self.message}

    def anthropic_status(self) -> int:
        """The HTTP status on Anthropic's routes: 529 for ``overloaded_error``,
        as Anthropic's API answers it (a full queue, a model down or
        starting, a replica stopping; the SDK raises ``OverloadedError`` and
        retries), where OpenAI's routes answer 503 (or 429); else the same."""
        return anthropic_status(self.status_code, self.code)

    def anthropic_type(self) -> str:
        if self.code == "overloaded":
            return "overloaded_error"
        return _ANTHROPIC_TYPES.get(self.status_code, "api_error" if self.status_code >= 500 else "invalid_request_error")

    def to_wire(self) -> dict[str, Any]:
        """Everything needed to raise this error again in another process
        (``from_wire``), as JSON-ready data: the stream relay's error answers."""
        return {
            "class": type(self).__name__,
            "message": self.message,
            "param": self.param,
            "code": self.code,
            "status": self.status_code,
            "retry_after_s": self.retry_after_s,
        }

    @staticmethod
    def from_wire(data: dict[str, Any]) -> GatewayError:
        """The error ``to_wire`` described; an unknown class arrives as a plain 500."""
        cls = _CLASSES.get(str(data.get("class")))
        if cls is None:
            return InternalServerError("The model failed while serving the request.")
        return _rebuild(
            cls, str(data["message"]), data.get("param"), data.get("code"),
            int(data["status"]), data.get("retry_after_s"),
        )

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for retryable errors)."""
        if self.retry_after_s is None:
            return dict(self.extra_headers)
        return {**self.extra_headers, "retry-after": str(self.retry_after_s)}


def _rebuild(
    cls: type[GatewayError],
    message: str,
    param: str | None,
    code: str | None,
    status: int,
    retry_after_s: int | None,
) -> GatewayError:
    return cls(message, param=param, code=code, status=status, retry_after_s=retry_after_s)


class InvalidRequestError(GatewayError):
    """The client sent something we cannot serve (400)."""

    status = 400
    type = "invalid_request_error"

    @classmethod
    def from_validation(cls, exc: ValidationError) -> InvalidRequestError:
        """The problem pydantic found, as OpenAI words it: the offending
        field's path in ``param`` (``gateway.validation``)."""
        from gateway.validation import describe

        message, param, code = describe(exc.errors())
        return cls(message, param=param, code=code)


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested output tokens do not fit the model's context (400)."""

    default_code = "context_length_exceeded"


class AuthenticationError(GatewayError):
    """A missing, unknown or expired API key (401)."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class RequestTooLargeError(InvalidRequestError):
    """The request body is over the gateway's limit (413); refused unread."""

    status = 413
    default_code = "request_too_large"


class UnsupportedEncodingError(InvalidRequestError):
    """The request body is in a content coding the gateway cannot decode
    (415); ``Accept-Encoding`` names the ones it can, as RFC 9110 asks."""

    status = 415
    default_code = "unsupported_content_encoding"


class UnsupportedMediaTypeError(InvalidRequestError):
    """The request body is labelled as something other than JSON (415), as
    vLLM's own server and OpenAI's API refuse it: a body sent as a form or
    as text was not meant as this JSON, whatever it happens to parse as."""

    status = 415
    default_code = "unsupported_media_type"


class RequestReadTimeoutError(InvalidRequestError):
    """The request body did not arrive within the gateway's read timeout (408)."""

    status = 408
    default_code = "request_read_timeout"


class PermissionDeniedError(GatewayError):
    """A request the gateway does not take from where it came (403)."""

    status = 403
    type = "invalid_request_error"
    default_code = "origin_not_allowed"


class NotFoundError(GatewayError):
    """No such route or resource (404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The requested model is not served here (404)."""

    default_code = "model_not_found"

    @classmethod
    def for_model(cls, name: str) -> ModelNotFoundError:
        return cls(f"The model `{name}` does not exist.", param="model")


class ModelNotSupportedError(NotFoundError):
    """The model exists but does not answer this endpoint (404), e.g. chat to a classifier."""

    default_code = "model_not_supported"


class ResponseNotFoundError(NotFoundError):
    """A stored response (Responses API) that does not exist, is not the
    caller's, or is no longer kept (404; named as ``previous_response_id``,
    400 ``previous_response_not_found``, as OpenAI answers it)."""

    default_code = "response_not_found"

    @classmethod
    def for_id(cls, response_id: str, param: str | None = None) -> ResponseNotFoundError:
        previous = param == "previous_response_id"
        return cls(
            f"{'Previous response' if previous else 'Response'} with id '{response_id}' not found. "
            "Responses are kept by the model replica that made them, for as long as it runs and "
            "within its model's `stored_responses` (past it the oldest go first).",
            param=param,
            code="previous_response_not_found" if previous else None,
            status=400 if previous else None,
        )


class MethodNotAllowedError(GatewayError):
    """The route exists but not for this HTTP method (405)."""

    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RateLimitError(GatewayError):
    """An API key is over one of its limits (429). ``type`` names the limit's
    kind as OpenAI does (``requests`` or ``tokens``); ``retry_after_ms`` is
    when the request would fit (None: it never will, as it stands)."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_ms: int | None = None, **kwargs: Any) -> None:
        if retry_after_ms is not None:
            kwargs.setdefault("retry_after_s", max(1, -(-retry_after_ms // 1000)))
        super().__init__(message, **kwargs)
        if retry_after_ms is not None:
            self.extra_headers["retry-after-ms"] = str(retry_after_ms)


class TokenRateLimitError(RateLimitError):
    """Over a key's tokens-per-minute limit (429, ``type: tokens``)."""

    type = "tokens"


class NotImplementedFeatureError(GatewayError):
    """The request asks for something this model or engine does not support:
    the client's to change (400), not a server failure that a retry or
    another variant (``fallback``) could mend."""

    status = 400
    type = "invalid_request_error"
    default_code = "not_implemented"


# What a replica whose engine died answers (503) until it is replaced.
ENGINE_DEAD = "The model's engine stopped; a new replica is starting. Please retry shortly."
# What a request answers whose engine stopped while it was being served (503):
# not tried on another replica, where the request, if it stopped the engine, would stop that one too.
ENGINE_DIED = (
    "The model's engine stopped while serving this request; a new replica is starting. Please retry shortly."
)
# What a stopping replica answers a request still waiting in its queue (503).
REPLICA_STOPPING = "This replica of the model is stopping; please retry shortly."


class ServiceUnavailableError(GatewayError):
    """A model deployment cannot take the request now; retry later (503)."""

    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int | None = 1, **kwargs: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **kwargs)


class OverloadedError(ServiceUnavailableError):
    """The model's queue is full (503, or 429 when the deployment says so)."""

    default_code = "overloaded"


class ShuttingDownError(ServiceUnavailableError):
    """The ingress replica is stopping and the request outran the time its
    requests in flight had to finish (503): it was stopped and is answered
    here rather than cut off. Not retried on another variant: the time is
    spent; the client's retry reaches a replica that is not stopping."""

    default_code = "shutting_down"


class RequestTimeoutError(GatewayError):
    """The model took longer than its ``request_timeout_s``; its engine request
    was aborted (504). Not retried on another variant: the time is spent."""

    status = 504
    type = "server_error"
    default_code = "request_timeout"


class InternalServerError(GatewayError):
    """A bug or an engine failure; details go to the logs, not the client (500)."""

    status = 500
    type = "server_error"
    default_code = "internal_error"


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_status(status: int, code: str | None) -> int:
    """The status an error of ``status`` and ``code`` has on Anthropic's
    routes: 529 where its type is ``overloaded_error``, else the same."""
    return 529 if code == "overloaded" or _ANTHROPIC_TYPES.get(status) == "overloaded_error" else status


def _subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


# The tree above by name, for errors that arrive as data.
_CLASSES: dict[str, type[GatewayError]] = {cls.__name__: cls for cls in _subclasses(GatewayError)}
