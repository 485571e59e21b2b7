"""The classical-model replica: requests batched by ``@serve.batch``.

Each request is checked on its own inside the batch, so a bad one fails alone;
the good ones share one model call. Should that call fail anyway, each request
is retried alone, so a failure still reaches only the request that caused it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ray import serve

from gateway.affinity import unpin_self
from gateway.errors import GatewayError, InternalServerError, InvalidRequestError
from gateway.heap_freeze import freeze_in_replica
from gateway.protocol.engine import Outcome, Reply
from gateway.replica_logs import to_stderr
from models.classical.endpoints import Job, UnrepresentableAnswer, parse
from models.classical.heap import HeapTrimmer
from models.classical.predictor import Predictor, load_predictor, refused_input
from models.llm.engine import EngineInfo
from models.llm.server import ClientErrorFilter

if TYPE_CHECKING:
    from gateway.config import ClassicalModelConfig
    from gateway.protocol.engine import EngineRequest

logger = logging.getLogger(__name__)

# Instances per model call within a batch. The model runs on the event loop
# (see ``_batch``), and a batch may hold thousands of texts (minutes of
# work): between calls of this many the loop runs what waits, Serve's health
# checks included, which otherwise fail and get the replica replaced.
PART_INSTANCES = 64


class ClassicalServer:
    """A Serve deployment class (made a deployment in ``gateway.app``).

    ``generate`` answers one request with a ``Reply`` (the response's JSON
    bytes and its outcome: tokens, and the batch's size on one request of
    each batch), or raises ``gateway.errors.GatewayError``. Batching settings arrive through
    ``reconfigure`` (the deployment's ``user_config``), so they change live.
    """

    async def __init__(  # type: ignore[misc]
        self, config: ClassicalModelConfig, predictor: Predictor | None = None
    ) -> None:
        to_stderr()
        logging.getLogger("ray.serve").addFilter(ClientErrorFilter())
        unpin_self()  # see gateway.affinity: models compute on every CPU
        self._config = config
        self._predictor = (
            predictor
            if predictor is not None
            else await asyncio.to_thread(load_predictor, config)
        )
        self._batch_sizes: Counter[int] = Counter()
        self._heap = HeapTrimmer()  # see models.classical.heap: resident memory stays flat
        self._calls = 0  # calls received; the requests they carried are the batches' sum
        self._batching = config.batching()
        # Decorated per instance: each server owns its batch queue.
        self._run_batch: Any = serve.batch(
            max_batch_size=config.max_batch_size,
            batch_wait_timeout_s=config.batch_wait_timeout_s,
        )(self._batch)
        # Embedding models report the dtype their weights run in (``auto`` resolved).
        self._dtype: str | None = getattr(self._predictor, "dtype", None)
        freeze_in_replica()  # see gateway.heap_freeze: no full collection walks the model's objects
        logger.info("%s ready (%s, %s)", config.name, self._predictor.kind, self._dtype or "-")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applies ``max_batch_size`` and ``batch_wait_timeout_s`` to the running queue."""
        self._batching = {
            "max_batch_size": int(user_config["max_batch_size"]),
            "batch_wait_timeout_s": float(user_config["batch_wait_timeout_s"]),
        }
        self._run_batch.set_max_batch_size(self._batching["max_batch_size"])
        self._run_batch.set_batch_wait_timeout_s(self._batching["batch_wait_timeout_s"])

    async def generate(self, request: EngineRequest) -> Reply:
        self._calls += 1
        result = await self._run_batch(request)
        if isinstance(result, GatewayError):
            raise result
        return result  # type: ignore[no-any-return]

    async def generate_many(self, requests: list[EngineRequest]) -> list[Reply | GatewayError]:
        """Answers a group of requests an ingress replica sent together, each on its
        own: its ``Reply``, or its error (returned, not raised, so it reaches only
        its own request). The group's requests join the batch queue one by one."""
        self._calls += 1
        return list(await asyncio.gather(*(self._run_batch(request) for request in requests)))

    async def _batch(self, requests: list[EngineRequest]) -> list[Reply | GatewayError]:
        self._batch_sizes[len(requests)] += 1
        if self._predictor.kind == "embedding":
            # Tokenizing is checking: 256 texts of long words take seconds, which the tokenizer
            # spends without the GIL. In a thread the loop runs meanwhile (Serve's health checks,
            # requests joining the next batch); the model itself runs on the loop, below.
            jobs = await asyncio.to_thread(self._checked, requests)
        else:
            jobs = self._checked(requests)
        valid = [job for job in jobs if isinstance(job, Job)]
        # The model runs on the event loop, as Serve's batching expects: what
        # arrives meanwhile waits and joins the next batch whole. Measured here,
        # a worker thread fought the loop for the GIL, took requests in one by
        # one and made batches a third as large (and throughput 30% lower).
        answers = iter(await self._answer_in_parts(valid))
        results = [job if isinstance(job, GatewayError) else next(answers) for job in jobs]
        self._heap.after_batch()
        return _replies(jobs, results)

    def _checked(self, requests: list[EngineRequest]) -> list[Job | GatewayError]:
        """Each request's job, or its own error."""
        jobs: list[Job | GatewayError] = []
        for request in requests:
            try:
                jobs.append(parse(request, self._predictor, self._config.max_instances_per_request))
            except GatewayError as error:
                jobs.append(error)
            except Exception:  # noqa: BLE001 - a check that broke fails its own request alone
                logger.exception("%s failed to check a request", self._config.name)
                jobs.append(InternalServerError("The model failed to answer this request."))
        return jobs

    async def _answer_in_parts(self, jobs: list[Job]) -> list[bytes | GatewayError]:
        """The jobs' answers, from model calls of about ``PART_INSTANCES``
        instances (a job is never split), letting the loop run between them."""
        answers: list[bytes | GatewayError] = []
        part: list[Job] = []
        size = 0
        for job in jobs:
            part.append(job)
            size += self._predictor.size(job.inputs)
            if size >= PART_INSTANCES:
                answers += self._answer(part)
                part, size = [], 0
                await asyncio.sleep(0)
        return answers + (self._answer(part) if part else [])

    def _answer(self, jobs: list[Job]) -> list[bytes | GatewayError]:
        try:
            predictions = self._predictor.predict([job.inputs for job in jobs])
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(jobs) == 1:
                if (said := refused_input(exc)) is not None:  # the client's values, not the model
                    message = f"The model cannot compute with these inputs: {said}"
                    return [InvalidRequestError(message, param=jobs[0].param)]
                logger.exception("%s failed to predict", self._config.name)
                return [InternalServerError("The model failed to answer this request.")]
            return [answer for job in jobs for answer in self._answer([job])]
        return [self._render(job, p) for job, p in zip(jobs, predictions)]

    def _render(self, job: Job, predictions: list[Any]) -> bytes | GatewayError:
        """The job's answer, or its own error: a prediction JSON cannot carry
        fails its request, not its batch-mates."""
        try:
            return job.render(job, predictions)
        except UnrepresentableAnswer:
            if _extreme(job.inputs):
                # Finite inputs that overflow a model's own arithmetic (1.7e308 through a logistic
                # regression): scikit-learn checks what enters an estimator, not what leaves it.
                message = "The model cannot compute with these inputs: its answer is not a finite number"
                return InvalidRequestError(message, param=job.param)
            # Ordinary inputs (or an embedding model's texts): the model's own fault, a broken artifact.
            logger.error("%s answered a number JSON cannot carry (NaN or infinity)", self._config.name)
            return InternalServerError("The model's answer holds a number JSON cannot carry (NaN or infinity).")
        except Exception:  # noqa: BLE001
            logger.exception("%s failed to render an answer", self._config.name)
            return InternalServerError("The model failed to answer this request.")

    def stats(self) -> dict[str, Any]:
        """How many batches of each size this replica has run, the calls it received
        and the requests they carried, its batch settings, the start-up objects
        no full collection walks (``gateway.heap_freeze``) and, for embedding
        models, the dtype its weights run in."""
        requests = sum(size * count for size, count in self._batch_sizes.items())
        stats = {
            "batch_sizes": dict(self._batch_sizes),
            "calls": self._calls,
            "requests": requests,
            "frozen_objects": gc.get_freeze_count(),
            **self._batching,
        }
        if self._dtype is not None:
            stats["dtype"] = self._dtype
        return stats

    def info(self) -> EngineInfo:
        """What the ingress learns of this model once: the most tokens one
        input holds (an embedding model's window; None: no such bound), which
        caps what a key's token limit reserves for each input."""
        return EngineInfo(root=None, max_model_len=getattr(self._predictor, "max_tokens", None))

    async def check_health(self) -> None:
        """Called by Serve's health checks: the model is loaded in-process."""


# Feature values this large overflow a model's arithmetic by themselves (a
# product with a weight, a square): its NaN answer is then the inputs' doing.
EXTREME = 1e150


def _extreme(inputs: Any) -> bool:
    """Whether a scikit-learn model's inputs (an array of numbers) hold a value
    of magnitude ``EXTREME`` or more; never an embedding model's texts."""
    return isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f" and bool(inputs.size) and (
        float(np.abs(inputs).max()) >= EXTREME
    )


def _replies(
    jobs: list[Job | GatewayError], results: list[bytes | GatewayError]
) -> list[Reply | GatewayError]:
    """Answers with their outcomes; the batch's size rides on its first answer
    (a batch whose every request failed has none to ride on, and is not counted)."""
    replies: list[Reply | GatewayError] = []
    size: int | None = len(jobs)
    for job, result in zip(jobs, results):
        if isinstance(result, GatewayError):
            replies.append(result)
            continue
        assert not isinstance(job, GatewayError)  # a failed job has its error as result
        replies.append(Reply(result, Outcome(prompt_tokens=job.prompt_tokens, batch_size=size)))
        size = None
    return replies
