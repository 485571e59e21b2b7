"""Classical models: KServe V1 predict and OIP V2 infer over batched iris replicas."""

from __future__ import annotations

import asyncio
import copy
import json
from collections import Counter
from typing import Any

import httpx
import numpy as np
import pytest
from scipy.stats import chisquare

from tests.integration.conftest import MODELS, TEST_CONFIG, VLLM_MODEL, Gateway
from tests.integration.test_routing import replica_process

VARIANT = "x-gateway-variant"


@pytest.fixture(scope="module")
def iris() -> tuple[Any, np.ndarray, list[dict[str, Any]]]:
    """The iris features and the estimator's own in-process answers."""
    import joblib
    from sklearn.datasets import load_iris

    estimator = joblib.load(MODELS / "iris" / "model.joblib")
    features = load_iris().data
    expected = [
        {"label": label, "probabilities": dict(zip(estimator.classes_, map(float, p)))}
        for label, p in zip(estimator.predict(features), estimator.predict_proba(features))
    ]
    return estimator, features, expected


def test_predictions_over_the_whole_dataset_equal_the_estimators(http: httpx.Client, iris: Any) -> None:
    _, features, expected = iris
    response = http.post("/v1/models/iris:predict", json={"instances": features.tolist()})
    assert response.status_code == 200, response.text
    assert response.headers[VARIANT] == "iris"
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    for got, want in zip(predictions, expected):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-12)


async def test_concurrent_single_rows_are_batched_and_each_gets_its_own_answer(
    gateway: Gateway, iris: Any
) -> None:
    _, features, expected = iris
    before = await asyncio.to_thread(gateway.call, "iris", "stats")
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:

        async def one(row: list[float]) -> dict[str, Any]:
            response = await session.post("/v1/models/iris:predict", json={"instances": [row]})
            assert response.status_code == 200, response.text
            return response.json()["predictions"][0]  # type: ignore[no-any-return]

        answers = await asyncio.gather(*(one(row) for row in features.tolist()))
    assert [a["label"] for a in answers] == [e["label"] for e in expected]
    after = await asyncio.to_thread(gateway.call, "iris", "stats")
    new_batches = Counter(after["batch_sizes"]) - Counter(before["batch_sizes"])
    assert sum(int(size) * count for size, count in new_batches.items()) == len(features)
    assert max(int(size) for size in new_batches) > 1, new_batches


async def test_a_poisoned_request_fails_alone_inside_its_batch(gateway: Gateway) -> None:
    # One full batch: 20 requests, held up to 10 s until all have arrived.
    # Batching changes live, without restarting the replica.
    held = copy.deepcopy(TEST_CONFIG)
    iris_entry = next(m for m in held["models"] if m["name"] == "iris")
    iris_entry.update(max_batch_size=20, batch_wait_timeout_s=10)
    replica = replica_process("iris")
    await asyncio.to_thread(gateway.redeploy, held)
    try:
        stats = await asyncio.to_thread(gateway.call, "iris", "stats")
        assert (stats["max_batch_size"], stats["batch_wait_timeout_s"]) == (20, 10)
        bodies: list[Any] = [{"instances": [[5.1, 3.5, 1.4, 0.2]]} for _ in range(19)]
        bodies.insert(7, {"instances": [[5.1, 3.5, 1.4, 0.2], [1, 2, 3]]})
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
            responses = await asyncio.gather(
                *(session.post("/v1/models/iris:predict", json=body) for body in bodies)
            )
        after = await asyncio.to_thread(gateway.call, "iris", "stats")
        assert after["batch_sizes"].get(20, 0) == stats["batch_sizes"].get(20, 0) + 1
        assert [r.status_code for r in responses] == [200] * 7 + [400] + [200] * 12
        assert responses[7].json()["error"]["message"] == "instances[1]: expected 4 features, got 3"
        assert {r.json()["predictions"][0]["label"] for i, r in enumerate(responses) if i != 7} == {"setosa"}
        assert replica_process("iris") == replica, "changing batching restarted the replica"
    finally:
        await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"instances": [[1, 2, 3, 4], [1, 2, 3]]}, "instances[1]: expected 4 features, got 3", "instances[1]"),
        ({"instances": [[1, 2, "x", 4]]}, "instances[0]: feature 2 is not a number (a string)", "instances[0]"),
        ({"instances": [[1, 2, True, 4]]}, "instances[0]: feature 2 is not a number (a boolean)", "instances[0]"),
        ({"instances": [{"a": 1}]}, "instances[0]: expected a list of 4 numbers, got an object", "instances[0]"),
        ({"instances": [[1, 2, 3, None]]}, "instances[0]: feature 3 is not a number (null)", "instances[0]"),
        ({"instances": []}, "Invalid 'instances': empty array. Expected an array with minimum length 1, but got an empty array instead.", "instances"),
        ({"instances": [[1, 2, 3, 4]] * 201}, "'instances' holds 201 entries; this model accepts at most 200 per request.", "instances"),
        ({}, "Missing required parameter: 'instances'.", "instances"),
        ({"instances": [[1, 2, 3, 4]], "signature_name": "x"}, "Unrecognized request argument supplied: signature_name", "signature_name"),
    ],
    ids=["feature-count", "non-numeric", "boolean", "object", "null", "empty", "over-cap", "missing", "unknown-field"],
)
def test_bad_instances_are_openai_shaped_400s(
    http: httpx.Client, body: dict[str, Any], message: str, param: str
) -> None:
    response = http.post("/v1/models/iris:predict", json=body)
    assert response.status_code == 400
    # OpenAI's codes where its validation has one for the words.
    code = {"Missing": "missing_required_parameter", "Invalid 'instances': empty array": "empty_array"}
    expected = next((value for prefix, value in code.items() if message.startswith(prefix)), None)
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": expected}
    }


def test_non_finite_feature_is_a_400(http: httpx.Client) -> None:
    raw = b'{"instances": [[1, 2, NaN, 4]]}'
    response = http.post("/v1/models/iris:predict", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "instances[0]: feature 2 is not a finite number"


def test_v2_infer_answers_labels_and_probabilities(http: httpx.Client, iris: Any) -> None:
    _, features, expected = iris
    rows = features[:10]
    body = {
        "id": "req-1",
        "inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.reshape(-1).tolist()}],
    }
    response = http.post("/v2/models/iris/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "iris" and answer["id"] == "req-1"
    label, probabilities = answer["outputs"]
    assert label == {"name": "label", "shape": [10], "datatype": "BYTES", "data": [e["label"] for e in expected[:10]]}
    assert probabilities["shape"] == [10, 3]
    want = [p for e in expected[:10] for p in e["probabilities"].values()]
    assert probabilities["data"] == pytest.approx(want, abs=1e-12)


def test_v2_infer_refuses_a_shape_that_does_not_match_the_data(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    response = http.post("/v2/models/iris/infer", json=body)
    assert response.status_code == 400
    # The Open Inference Protocol's error: its message alone, where tritonclient and KServe's clients read it.
    assert response.json() == {"error": "inputs[0]: shape [2, 4] holds 8 values but 'data' has 4"}


def test_v2_infer_answers_the_outputs_asked_for_and_tritonclients_unlabelled_body(http: httpx.Client) -> None:
    """tritonclient names its outputs, asks for them binary by default (a preference: it reads
    JSON `data` too), and sends its JSON body with no Content-Type."""
    tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
    asked = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    body = json.dumps({"inputs": [tensor], "outputs": asked}).encode()
    response = http.post("/v2/models/iris/infer", content=body)
    assert response.status_code == 200, response.text
    assert [output["name"] for output in response.json()["outputs"]] == ["probabilities"]
    unknown = http.post("/v2/models/iris/infer", json={"inputs": [tensor], "outputs": [{"name": "output0"}]})
    assert unknown.status_code == 400 and "no output 'output0'" in unknown.json()["error"]


def test_v2_health_and_metadata_answer_as_the_protocol_requires(http: httpx.Client) -> None:
    """What tritonclient's is_server_live / is_model_ready / get_model_metadata and Kubernetes probes call."""
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2").json()["name"] == "llm-gateway"
    assert http.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    metadata = http.get("/v2/models/iris").json()
    assert metadata["name"] == "iris" and [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]
    assert http.get("/v2/models/minilm").json()["inputs"][0]["datatype"] == "BYTES"
    missing = http.get("/v2/models/no-such-model/ready")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def test_v2_binary_tensors_are_refused_as_such(http: httpx.Client) -> None:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}}
    header = json.dumps({"inputs": [tensor]})
    marked = {"inference-header-content-length": str(len(header))}
    refused = http.post("/v2/models/iris/infer", content=header.encode() + bytes(32), headers=marked)
    assert refused.status_code == 400 and "binary_data=False" in refused.json()["error"]


def test_v1_predict_takes_kserves_inputs_too(http: httpx.Client) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2]]
    by_inputs = http.post("/v1/models/iris:predict", json={"inputs": rows})
    assert by_inputs.status_code == 200, by_inputs.text
    assert by_inputs.json() == http.post("/v1/models/iris:predict", json={"instances": rows}).json()


async def test_classifier_versions_split_by_weight_and_stick_per_session(gateway: Gateway) -> None:
    n = 300
    body = {"instances": [[6.0, 2.9, 4.5, 1.5]]}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        unkeyed = await asyncio.gather(*(session.post("/v1/models/iris-ab:predict", json=body) for _ in range(n)))
        sticky = [
            (await session.post("/v1/models/iris-ab:predict", json=body, headers={"x-session-id": "s-1"})).headers[VARIANT]
            for _ in range(10)
        ]
    counts = Counter(r.headers[VARIANT] for r in unkeyed)
    assert set(counts) == {"iris", "iris-tree"}
    assert chisquare([counts["iris"], counts["iris-tree"]], [n / 2, n / 2]).pvalue > 0.001
    assert len(set(sticky)) == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", "/v1/chat/completions", {"model": "iris", "messages": [{"role": "user", "content": "hi"}]},
         "The model `iris` (classifier) does not serve /v1/chat/completions."),
        ("POST", "/v1/embeddings", {"model": "iris-ab", "input": "hi"},
         "The model `iris-ab` (classifier) does not serve /v1/embeddings."),
        ("POST", f"/v1/models/{VLLM_MODEL}:predict", {"instances": [[1, 2, 3, 4]]},
         f"The model `{VLLM_MODEL}` (llm) does not serve /v1/models/{VLLM_MODEL}:predict."),
    ],
    ids=["chat-to-classifier", "embeddings-to-classifier-alias", "predict-to-llm"],
)
def test_an_endpoint_the_model_does_not_serve_is_a_404(
    http: httpx.Client, method: str, path: str, body: dict[str, Any], message: str
) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": "model", "code": "model_not_supported"
    }


def test_predict_to_an_unknown_model_is_404(http: httpx.Client) -> None:
    response = http.post("/v1/models/nope:predict", json={"instances": [[1, 2, 3, 4]]})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
