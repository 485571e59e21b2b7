"""models/classical/server.py: batching, isolation of bad requests, live settings."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.config import SklearnModelConfig
from gateway.errors import InternalServerError, InvalidRequestError
from gateway.protocol.engine import EngineRequest, Reply
from models.classical.build import build_iris
from models.classical.server import ClassicalServer
from models.classical.sklearn import SklearnPredictor


@pytest.fixture(autouse=True)
def replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's batch queue reads its replica's settings; outside Serve, give it some."""
    from types import SimpleNamespace

    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


@pytest.fixture(autouse=True)
async def batch_queues_collected_on_the_loop() -> AsyncIterator[None]:
    """A server and its batch queue are a reference cycle (the queue's task runs the
    server's method). Collected where no event loop runs, in whichever thread the
    collector next runs, Ray's queue makes an event loop to ask whether one runs and
    never closes it: an unclosed socket in some later test. Collected here, on the
    test's running loop, the queue cancels its task and makes none."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def iris_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_iris("iris", tmp_path_factory.mktemp("iris"))


def predict(rows: list[Any]) -> EngineRequest:
    return EngineRequest("predict", {"instances": rows}, "r", "iris")


class CountingPredictor(SklearnPredictor):
    """The real estimator, recording each model call; optionally failing on a value."""

    def __init__(self, estimator: Any, poison: float | None = None) -> None:
        super().__init__(estimator)
        self.calls: list[int] = []
        self.poison = poison

    def predict(self, batch: Sequence[Any]) -> list[list[Any]]:
        self.calls.append(len(batch))
        if self.poison is not None and any((inputs == self.poison).any() for inputs in batch):
            raise ValueError("the model cannot take this value")
        return super().predict(batch)


async def make_server(iris_dir: Path, poison: float | None = None, **settings: Any) -> tuple[ClassicalServer, CountingPredictor]:
    config = SklearnModelConfig(name="iris", model=str(iris_dir), **settings)
    predictor = CountingPredictor(SklearnPredictor.load(str(iris_dir))._estimator, poison)
    server = ClassicalServer.__new__(ClassicalServer)
    await server.__init__(config, predictor)  # type: ignore[misc]  # Ray actors construct asynchronously
    return server, predictor


async def test_concurrent_requests_share_one_model_call(iris_dir: Path) -> None:
    server, predictor = await make_server(iris_dir, max_batch_size=8, batch_wait_timeout_s=0.5)
    answers = await asyncio.gather(*(server.generate(predict([[5.1, 3.5, 1.4, 0.2]])) for _ in range(8)))
    assert predictor.calls == [8]
    assert server.stats()["batch_sizes"] == {8: 1}
    assert {json.loads(a.body)["predictions"][0]["label"] for a in answers} == {"setosa"}
    # The batch's size rides on exactly one answer, so each batch is counted once.
    assert [a.outcome.batch_size for a in answers] == [8] + [None] * 7


async def test_a_model_whose_inputs_have_no_token_window_says_so(iris_dir: Path) -> None:
    # (The ingress caps a key's reservation per input at the window an embedding model says.)
    server, _ = await make_server(iris_dir)
    assert server.info().max_model_len is None


async def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered(iris_dir: Path) -> None:
    server, predictor = await make_server(iris_dir, max_batch_size=3, batch_wait_timeout_s=0.5)
    results = await asyncio.gather(
        server.generate(predict([[5.1, 3.5, 1.4, 0.2]])),
        server.generate(predict([[1, 2, 3]])),
        server.generate(predict([[6.7, 3.0, 5.2, 2.3]])),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidRequestError)
    assert results[1].message == "instances[0]: expected 4 features, got 3"
    assert [json.loads(r.body)["predictions"][0]["label"] for r in (results[0], results[2])] == ["setosa", "virginica"]  # type: ignore[union-attr]
    assert [r.outcome.batch_size for r in (results[0], results[2])] == [3, None]  # type: ignore[union-attr]
    assert predictor.calls == [2] and server.stats()["batch_sizes"] == {3: 1}


async def test_a_model_failure_is_retried_alone_so_only_its_request_fails(iris_dir: Path) -> None:
    server, predictor = await make_server(iris_dir, poison=9.5, max_batch_size=3, batch_wait_timeout_s=0.5)
    results = await asyncio.gather(
        server.generate(predict([[5.1, 3.5, 1.4, 0.2]])),
        server.generate(predict([[9.5, 3.5, 1.4, 0.2]])),
        server.generate(predict([[6.7, 3.0, 5.2, 2.3]])),
        return_exceptions=True,
    )
    assert isinstance(results[1], InternalServerError)
    assert "Traceback" not in results[1].message
    assert all(isinstance(results[i], Reply) for i in (0, 2))
    assert predictor.calls == [3, 1, 1, 1]  # the batch, then each request alone


async def test_answers_return_to_their_callers_in_order(iris_dir: Path) -> None:
    server, _ = await make_server(iris_dir, max_batch_size=16, batch_wait_timeout_s=0.05)
    from models.classical.build import iris_data

    features, labels = iris_data()
    rows = features.tolist()[::10]
    answers = await asyncio.gather(*(server.generate(predict([row, row])) for row in rows))
    predicted = [[p["label"] for p in json.loads(a.body)["predictions"]] for a in answers]
    expected = SklearnPredictor.load(str(iris_dir))._estimator.predict(features[::10])
    assert predicted == [[label, label] for label in expected]


async def test_reconfigure_changes_batching_live(iris_dir: Path) -> None:
    server, predictor = await make_server(iris_dir, max_batch_size=8, batch_wait_timeout_s=0.5)
    server.reconfigure({"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    assert server.stats()["max_batch_size"] == 1
    await asyncio.gather(*(server.generate(predict([[5.1, 3.5, 1.4, 0.2]])) for _ in range(4)))
    assert predictor.calls == [1, 1, 1, 1]


async def test_more_instances_than_the_cap_is_a_400(iris_dir: Path) -> None:
    server, _ = await make_server(iris_dir, max_instances_per_request=2)
    with pytest.raises(InvalidRequestError, match="'instances' holds 3 entries; this model accepts at most 2"):
        await server.generate(predict([[1, 2, 3, 4]] * 3))


async def test_a_group_from_the_ingress_is_answered_request_by_request(iris_dir: Path) -> None:
    server, predictor = await make_server(iris_dir, max_batch_size=8, batch_wait_timeout_s=0.0)
    results = await server.generate_many(
        [predict([[5.1, 3.5, 1.4, 0.2]]), predict([[1, 2, 3]]), predict([[6.7, 3.0, 5.2, 2.3]])]
    )
    # The bad request's error comes back as a value, for its caller alone.
    assert isinstance(results[1], InvalidRequestError)
    assert results[1].message == "instances[0]: expected 4 features, got 3"
    assert [json.loads(r.body)["predictions"][0]["label"] for r in (results[0], results[2])] == ["setosa", "virginica"]  # type: ignore[union-attr]
    # The group's requests joined one batch, without waiting for more.
    assert predictor.calls == [2] and server.stats()["batch_sizes"] == {3: 1}
    assert (server.stats()["calls"], server.stats()["requests"]) == (1, 3)


async def test_groups_and_single_calls_share_batches(iris_dir: Path) -> None:
    server, predictor = await make_server(iris_dir, max_batch_size=6, batch_wait_timeout_s=0.5)
    row = [5.1, 3.5, 1.4, 0.2]
    group, *singles = await asyncio.gather(
        server.generate_many([predict([row])] * 4), server.generate(predict([row])), server.generate(predict([row]))
    )
    assert len(group) == 4 and all(isinstance(r, Reply) for r in [*group, *singles])
    assert predictor.calls == [6]
    assert (server.stats()["calls"], server.stats()["requests"]) == (3, 6)


async def test_a_check_or_answer_that_breaks_fails_its_own_request_alone(
    iris_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a client error the checks know: it once left the batch and failed
    # every request in it with a 500.
    server, predictor = await make_server(iris_dir, max_batch_size=4, batch_wait_timeout_s=0.5)
    checked, predicted = predictor.inputs, predictor.predict

    def breaking_inputs(instances: Any, param: str, **kwargs: Any) -> Any:
        if instances[0][0] == 7.5:
            raise KeyError("a check that broke")
        return checked(instances, param, **kwargs)

    def unrenderable_predict(batch: Sequence[Any]) -> list[list[Any]]:
        answers = predicted(batch)
        return [[object()] if rows[0][0] == 8.5 else a for rows, a in zip(batch, answers)]

    monkeypatch.setattr(predictor, "inputs", breaking_inputs)
    monkeypatch.setattr(predictor, "predict", unrenderable_predict)
    rows = [[5.1, 3.5, 1.4, 0.2], [7.5, 3.5, 1.4, 0.2], [8.5, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    results = await asyncio.gather(*(server.generate(predict([row])) for row in rows), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["Reply", "InternalServerError", "InternalServerError", "Reply"]
    assert [json.loads(r.body)["predictions"][0]["label"] for r in (results[0], results[3])] == ["setosa", "virginica"]  # type: ignore[union-attr]
    assert predictor.calls == [3]  # the three requests checked shared one model call


async def test_a_large_batch_runs_in_parts_and_the_loop_runs_between_them(iris_dir: Path) -> None:
    # The model runs on the replica's loop: a batch of thousands of texts
    # held it for minutes, and Serve's health checks failed meanwhile.
    server, predictor = await make_server(iris_dir, max_batch_size=8, batch_wait_timeout_s=0.0)
    setosa, virginica = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
    ticks, seen = 0, []

    async def ticking() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    predict_part = predictor.predict

    def recorded(batch: Sequence[Any]) -> list[list[Any]]:
        seen.append(ticks)  # how often the loop had run when each part began
        return predict_part(batch)

    predictor.predict = recorded  # type: ignore[method-assign]
    ticker = asyncio.ensure_future(ticking())
    requests = [predict([setosa if n % 2 else virginica] * 40) for n in range(5)]
    results = await server.generate_many(requests)
    ticker.cancel()
    # 200 instances, in parts of whole requests of at least 64: 80, 80, 40.
    assert predictor.calls == [2, 2, 1] and all(isinstance(r, Reply) for r in results)
    assert seen[0] < seen[1] < seen[2]  # the loop ran between the parts
    labels = [{p["label"] for p in json.loads(r.body)["predictions"]} for r in results]  # type: ignore[union-attr]
    assert labels == [{"virginica"}, {"setosa"}] * 2 + [{"virginica"}]  # each its own, in order


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, as the replica runs it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
async def test_values_the_model_cannot_compute_with_are_the_clients_error(tmp_path: Path, tree: bool) -> None:
    """1e308 is a float, but a tree computes in float32 and a scaler's step
    overflows: scikit-learn refuses the input. It was a 500, logged as the
    model failing; its batch-mates are answered."""
    directory = build_iris("iris-tree" if tree else "iris", tmp_path)
    server, _ = await make_server(directory, max_batch_size=3, batch_wait_timeout_s=0.5)
    huge = [-1e308, 1e308, 1.4, 0.2]
    overflowing = [0, 0, 1.7e308, 0]  # finite after scaling: the logistic regression's product overflows
    results = await asyncio.gather(
        server.generate(predict([[5.1, 3.5, 1.4, 0.2]])),
        server.generate(predict([huge])),
        server.generate(EngineRequest("predict", {"inputs": [huge]}, "r", "iris")),
        server.generate(predict([overflowing])),
        return_exceptions=True,
    )
    assert isinstance(results[0], Reply)
    for refused, param in zip(results[1:3], ("instances", "inputs")):
        assert isinstance(refused, InvalidRequestError) and refused.status_code == 400, refused
        assert refused.param == param
        assert refused.message.startswith("The model cannot compute with these inputs: Input X contains infinity")
    # Without the tree's float32 check it was a 500, logged as the model failing, and fallback asked another variant.
    assert isinstance(results[3], InvalidRequestError) and results[3].param == "instances", results[3]
    assert tree or results[3].message.endswith("its answer is not a finite number")


async def test_a_nan_answer_to_ordinary_inputs_is_the_models_failure(iris_dir: Path) -> None:
    # A broken artifact (NaN weights, say) fails every request: the server's error, not the client's.
    server, predictor = await make_server(iris_dir, max_batch_size=1, batch_wait_timeout_s=0.0)
    predicted = predictor.predict

    def broken(batch: Sequence[Any]) -> list[list[Any]]:
        answers = predicted(batch)
        return [[{**p, "probabilities": dict.fromkeys(p["probabilities"], float("nan"))} for p in a] for a in answers]

    predictor.predict = broken  # type: ignore[method-assign]
    failed = await server.generate_many([predict([[5.1, 3.5, 1.4, 0.2]])])
    assert isinstance(failed[0], InternalServerError), failed
