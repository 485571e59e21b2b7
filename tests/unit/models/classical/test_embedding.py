"""models/classical/embedding.py: the dtype MiniLM's weights run in, and what it changes.

The model is the real MiniLM that ``build-model`` copies into ``.models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.classical import embedding
from gateway.errors import ContextLengthExceededError
from models.classical.embedding import EmbeddingPredictor, cpu_computes_bf16, resolve_dtype

MINILM = Path(__file__).resolve().parents[4] / ".models" / "all-minilm-l6-v2"
SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by eight percent, beating every analyst's forecast.",
    "How do I reset my password?",
]


@pytest.fixture(scope="module")
def reference() -> Any:
    """MiniLM as sentence-transformers loads it by itself (float32)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM), device="cpu", local_files_only=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_named_dtype_stands_for_itself(dtype: str) -> None:
    assert resolve_dtype(dtype, "cpu") == dtype
    assert resolve_dtype(dtype, "cuda") == dtype


def test_auto_is_float16_on_gpu() -> None:
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("auto", "cuda:1") == "float16"


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cpu_is_bfloat16_only_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
) -> None:
    monkeypatch.setattr(embedding, "cpu_computes_bf16", lambda: native)
    assert resolve_dtype("auto", "cpu") == expected


def test_bf16_detection_agrees_with_the_cpu_flags() -> None:
    # x86 lists its instruction sets under "flags"; other CPUs count as lacking bf16.
    flags = {
        flag
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }
    assert cpu_computes_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_float32_gives_sentence_transformers_own_vectors(reference: Any) -> None:
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    assert predictor.dtype == "float32"
    got = predictor.embed(SENTENCES)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference.encode(SENTENCES), rtol=0, atol=1e-5)


def test_batches_are_padded_to_a_multiple_of_8_tokens_and_the_vectors_do_not_change(reference: Any) -> None:
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    texts = ["hello", "the sea is wide and deep tonight and the stars are out"]
    shape = predictor._model.preprocess(texts)["input_ids"].shape
    unpadded = reference.preprocess(texts)["input_ids"].shape
    assert shape[1] % 8 == 0 and unpadded[1] % 8 != 0 and shape[1] - unpadded[1] < 8
    np.testing.assert_allclose(predictor.embed(texts), reference.encode(texts), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_reduced_precision_stays_within_cosine_0_999_and_leaves_as_float32(
    reference: Any, dtype: str
) -> None:
    import torch

    predictor = EmbeddingPredictor.load(str(MINILM), dtype=dtype)
    assert predictor.dtype == resolve_dtype(dtype, "cpu")
    assert next(predictor._model.parameters()).dtype == getattr(torch, predictor.dtype)
    got = predictor.embed(SENTENCES)
    assert got.dtype == np.float32 and got.shape == (4, 384)
    want = reference.encode(SENTENCES)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.999, cosines
    # One sentence alone gets the vector it gets inside a batch.
    alone = predictor.embed(SENTENCES[2:3])[0]
    assert float(alone @ got[2] / np.linalg.norm(alone) / np.linalg.norm(got[2])) >= 0.9999


def test_a_large_batch_runs_in_passes_of_at_most_64_texts_in_its_own_order(
    reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One pass over a whole batch (up to 8,192 texts, all padded to the
    # longest) needs tens of GB; passes of 64 texts keep it near 0.5 GB.
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    passes: list[int] = []
    forward = predictor._model.forward

    def counted(features: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        passes.append(int(features["input_ids"].shape[0]))
        return forward(features, *args, **kwargs)

    monkeypatch.setattr(predictor._model, "forward", counted)
    texts = [SENTENCES[i % 4] * (1 + i % 7) for i in range(150)]
    got = predictor.embed(texts)
    assert passes == [64, 64, 22]
    np.testing.assert_allclose(got, reference.encode(texts, batch_size=1), rtol=0, atol=1e-5)


def test_a_text_longer_than_the_window_can_hold_is_refused_before_it_is_tokenized() -> None:
    # Tokenizing a body-sized text costs GB and seconds of the replica's loop.
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    assert predictor.max_chars == 256 * 100  # MiniLM's window × the most WordPiece reads as one token
    calls: list[int] = []
    tokenizer = predictor._tokenizer
    predictor._tokenizer = lambda texts: calls.append(len(texts)) or tokenizer(texts)
    with pytest.raises(ContextLengthExceededError) as refused:
        predictor.inputs(["fine", "x" * (predictor.max_chars + 1)], "input")
    assert refused.value.param == "input[1]" and "25601 characters" in str(refused.value)
    assert calls == []
    # Within it, more words than the window has tokens are refused untokenized too
    # (256 texts of 25,600 characters of prose took seconds to tokenize) ...
    with pytest.raises(ContextLengthExceededError, match="8533 words"):
        predictor.inputs(["ab " * (predictor.max_chars // 3)], "input", lone=True)
    assert calls == []
    # ... and below that the tokens decide, and a text padded with whitespace under the window is read.
    with pytest.raises(ContextLengthExceededError, match="tokens"):
        predictor.inputs(["ab, " * 200], "input", lone=True)  # 200 words, 402 tokens
    assert calls == [1]
    texts, counts = predictor.inputs([(" " * 30 + "word\n") * 200], "input", lone=True)
    assert len(texts[0]) > 256 * 18 and counts == [202]  # past vLLM's bound, well within the window
    # Words a normalizer joins or drops are not counted as tokens: these fit the window ...
    joined, dropped, marks = "a\x1f" * 300 + "b", "x" + " \u200b" * 300, "x" + " \u0301\u00ad" * 300
    texts, counts = predictor.inputs([joined, dropped, marks], "input")
    assert max(counts) < 10
    # (and those it deletes by their category: mojibake's U+FFFD, private use, tags, any script's marks)
    deleted = ["\ufffd", "\ue000", "\U000e0001", "\u05b0", "\u064b", "\u094d", "\U00100000"]
    texts, counts = predictor.inputs(["word " * 200 + " ".join(deleted * 15)], "input")
    assert counts == [202]
    # ... and prose of any script over the window is refused untokenized too.
    calls.clear()
    with pytest.raises(ContextLengthExceededError, match="2001 words"):
        predictor.inputs(["café " + "thé, " * 2000], "input", lone=True)
    assert calls == []


def test_a_requests_texts_are_tokenized_in_parts_and_the_first_over_the_window_ends_it() -> None:
    # Words of 100 letters pass the bounds above and make ~60 tokens each, quadratically slowly:
    # 256 such texts held the replica for seconds before the first was found too long.
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    calls: list[int] = []
    tokenizer = predictor._tokenizer
    predictor._tokenizer = lambda texts: calls.append(len(texts)) or tokenizer(texts)
    long_words = " ".join(["abcdefghij" * 10] * 50)
    texts = ["fine"] * 20 + [long_words] + ["fine"] * 200
    with pytest.raises(ContextLengthExceededError, match="tokens") as refused:
        predictor.inputs(texts, "input")
    assert refused.value.param == "input[20]" and calls == [16, 16]
    calls.clear()
    kept, counts = predictor.inputs(["fine"] * 40, "input")
    assert len(kept) == len(counts) == 40 and set(counts) == {3} and calls == [16, 16, 8]


def test_a_models_default_prompt_is_counted_with_each_text_as_the_model_reads_it() -> None:
    # A retrieval model's "query: " is put before every text: a text that fits only without it
    # would lose its end to truncation, and the usage and a key's count would leave it out.
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    model = predictor._model
    model.prompts, model.default_prompt_name = {"query": "query: "}, "query"
    prompted = EmbeddingPredictor(model)
    features = model.preprocess(["fine"], prompt="query: ")  # as encode() has it
    assert prompted.inputs(["fine"], "input")[1] == [int(features["attention_mask"].sum())] == [5]
    assert predictor.inputs(["fine"], "input")[1] == [3]
    fits_alone = " ".join(["word"] * (predictor.max_tokens - 2))  # [CLS] and [SEP]
    assert predictor.inputs([fits_alone], "input")[1] == [predictor.max_tokens]
    with pytest.raises(ContextLengthExceededError):
        prompted.inputs([fits_alone], "input")


def test_a_window_that_is_no_multiple_of_8_is_not_padded_past_it() -> None:
    # The tokenizer refuses to truncate to 250 and pad to a multiple of 8:
    # every request would fail.
    predictor = EmbeddingPredictor.load(str(MINILM), dtype="float32")
    model = predictor._model
    model.max_seq_length = 250
    model[0].processing_kwargs = {}
    embedding.pad_batches(model)
    assert "pad_to_multiple_of" not in model[0].processing_kwargs.get("text", {})
    features = model.preprocess(["word " * 400])
    assert features["input_ids"].shape[1] == 250
    model.max_seq_length = 256
    embedding.pad_batches(model)
    assert model[0].processing_kwargs["text"]["pad_to_multiple_of"] == 8
