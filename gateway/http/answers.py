"""How the gateway shapes a model's answer for its client, and counts it:
a whole JSON body, or a stream relayed byte for byte that ends, when the
model fails or the time runs out after its first byte, with an error frame
(or event) in its API's shape. Answers are counted in the metrics (and a
request's record) once the client has them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from fastapi.responses import Response

from gateway import sse
from gateway.errors import GatewayError, ServiceUnavailableError, anthropic_status
from gateway.http.deadlines import Stopping
from gateway.http.limits import Admission
from gateway.http.observe import CLIENT_CLOSED
from gateway.http.relay_stream import ClientSink, RelayedStream, StreamCutError
from gateway.http.relay_response import RelayResponse
from gateway.metrics.recorder import GatewayMetrics, RequestRecord
from gateway.protocol.engine import Endpoint, Outcome, Reply


class Answers:
    """Shapes and counts answers into ``metrics``; streams end at the
    replica's ``stopping`` too."""

    def __init__(self, metrics: GatewayMetrics, stopping: Stopping | None = None) -> None:
        self._metrics = metrics
        self._stopping = stopping if stopping is not None else Stopping()

    def whole(self, record: RequestRecord, reply: Reply, headers: Mapping[str, str]) -> Response:
        """A whole answer's JSON response, counted."""
        self.answered(record, reply.outcome)
        return Response(reply.body, media_type="application/json", headers=dict(headers))

    def streamed(
        self,
        stream: RelayedStream,
        endpoint: Endpoint,
        record: RequestRecord,
        headers: Mapping[str, str],
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> Response:
        """A stream's response: its bytes as they arrive (``_deliver``); closing
        it (the client left) closes the stream, aborting the engine request."""

        async def deliver(sink: ClientSink) -> None:
            await self._deliver(stream, sink, endpoint, record, deadline, timeout)

        return RelayResponse(deliver, dict(headers), closed=stream.close)

    def later(self, record: RequestRecord, admission: Admission | None) -> Callable[[Outcome | None], None]:
        """What counts a background response's outcome, once its replica has finished it."""

        def finished(outcome: Outcome | None) -> None:
            if outcome is not None:
                self._metrics.answered(record.model, record.variant, outcome, record.key)
            if admission is not None:
                admission.settle(outcome)

        return finished

    def generated_on(self, record: RequestRecord, admission: Admission | None) -> Callable[[Outcome | None], None]:
        """What counts a background stream's outcome once it has generated to
        its end, whether its client read it all or left: once, as ``answered``
        counts it where the client has it whole first."""

        def finished(outcome: Outcome | None) -> None:
            if outcome is not None and not record.counted:
                record.counted = True
                self._metrics.answered(record.model, record.variant, outcome, record.key)
            if admission is not None:
                admission.settle(outcome)

        return finished

    def answered(self, record: RequestRecord, outcome: Outcome) -> None:
        """Counts an answer the client is given (and keeps its outcome on ``record``)."""
        record.outcome = outcome
        if not record.counted:
            record.counted = True
            self._metrics.answered(record.model, record.variant, outcome, record.key)

    async def _deliver(
        self,
        stream: RelayedStream,
        sink: ClientSink,
        endpoint: Endpoint,
        record: RequestRecord,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """Sends the stream's bytes to ``sink`` as they arrive; its outcome is
        counted once the last of them has been handed to the client. A client
        that leaves closes the relay, which aborts the engine request; so does
        the ``deadline`` (loop time) or the replica's stop, and the client
        then gets an error frame."""
        error: GatewayError | None = None
        try:
            async with self._stopping.bounded(deadline):
                if not await stream.pipe(sink):
                    # The client left: a 499, also where the replica writing to
                    # its socket saw that before this loop did.
                    record.late_status = CLIENT_CLOSED
                    return
        except StreamCutError:
            error = ServiceUnavailableError("The model stopped while serving the request.")
        except TimeoutError:
            error = self._stopping.error(deadline, timeout, stream.generating_on)
        except asyncio.CancelledError:  # the client left (RelayResponse)
            if not await _whole_all_the_same(stream):
                raise
            sink.whole = True  # it had the whole answer: the response completes all the same
        except Exception:
            # A bug (RelayResponse logs it; the client gets a cut-off stream): counted as the
            # server's failure, not as the hang-up that a stream without its end looks like.
            record.error, record.late_status = "internal_error", 500
            raise
        finally:
            stream.close()  # at once, even where the client's hang-up left this unfinished
            record.handed_over = stream.handed_off
        if error is not None:
            await stream.released()  # a replica handed the client's socket writes no more
            if not stream.delivered:  # (a deadline that came after the stream's last byte is no error)
                record.error, record.late_status = error.code, _late_status(endpoint, error.status_code, error.code)
                await sink.send(sse.stream_error_after(endpoint, error, sink.before + sink.last))
                return
        if stream.body_ended:  # it ended the stream as the deadline came or the client left: the answer is whole
            sink.ended_elsewhere()
        if stream.outcome is not None:
            if stream.outcome.error is not None:  # the model ended the stream with an error frame
                error_code, status = stream.outcome.error, stream.outcome.error_status
                record.error, record.late_status = error_code, _late_status(endpoint, status, error_code)
            self.answered(record, stream.outcome)


def _late_status(endpoint: Endpoint, status: int | None, code: str | None) -> int | None:
    """The status a stream's error frame is logged and counted with: as its
    API would have answered it before the stream began (Anthropic's 529 for
    ``overloaded_error``)."""
    return anthropic_status(status, code) if endpoint == "messages" and status is not None else status


async def _whole_all_the_same(stream: RelayedStream) -> bool:
    """Whether a stream whose client left had been answered whole: a client
    that reads it to its last frame may hang up before the ingress has heard
    of its end (a replica handed the client's socket ends the body itself;
    one relayed sends its end mark a moment after its last frame). Then the
    stream is counted as answered (not as a hang-up), and its delivery is
    no longer cancelled."""
    stream.close()  # the replica, told, says how the stream ended
    await stream.released()
    if not stream.delivered:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True
