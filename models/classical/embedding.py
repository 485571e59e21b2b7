"""Sentence-embedding models (a sentence-transformers model directory).

Instances are texts. Inputs longer than the model's window are refused, not
truncated: the client learns which one, rather than getting the embedding of
a text it did not send.

Weights run in the configured dtype. ``auto`` follows vLLM's rule for float32
embedding models (downcast to a 16-bit type the device computes natively):
float16 on GPU, bfloat16 on CPUs with bf16 instructions, float32 elsewhere,
where bf16 would only be emulated. Vectors always leave as float32.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.errors import ContextLengthExceededError, InvalidRequestError


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype ``auto`` stands for on ``device``; other names stand for themselves."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_computes_bf16() else "float32"


# A batch's texts are padded to the longest, and the longest to a multiple of
# this. Every new (texts, tokens) shape makes the CPU's oneDNN kernels anew and
# keeps them in its cache: measured with MiniLM under varied batches
# (benchmarks/heap_trim.py), shapes in steps of 8 tokens made resident memory
# grow a third as fast and batches 12 % faster (more of them found in the cache).
PAD_TO_MULTIPLE_OF = 8

# Texts per forward pass. A batch may hold max_batch_size × max_instances_per_request
# texts (8,192 by default), all padded to its longest: as one pass that is
# tens of GB of activations. In passes of 64, sorted by length (as
# sentence-transformers does when a call holds several), memory stays near
# 0.5 GB and shorter texts carry less padding.
FORWARD_TEXTS = 64
# Texts tokenized at once when a request's are checked (see ``EmbeddingPredictor.inputs``).
TOKENIZED_TEXTS = 16
# The most characters WordPiece reads as one token (its ``max_input_chars_per_word``).
WORD_CHARS = 100


# Characters a tokenizer's normalizer deletes (BERT's: control and format
# characters, combining marks once accents are stripped), or keeps inside a
# word (line and paragraph separators), joining the words on either side.
_JOINING = [
    *range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0), 0xAD, 0x180E,
    *range(0x0300, 0x0370), *range(0x1AB0, 0x1B00), *range(0x1DC0, 0x1E00), *range(0x20D0, 0x2100),
    *range(0x200B, 0x2010), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2060, 0x2070),
    *range(0xFE20, 0xFE30), 0xFEFF, *range(0xFFF9, 0xFFFC),
]


def _deleted_pattern() -> re.Pattern[str]:
    """Those, and every character BERT's normalizer deletes by its category:
    format characters (Cf: tags, joiners), private use (Co), nonspacing marks
    (Mn, once accents are stripped) and U+FFFD (measured on MiniLM's own
    tokenizer; unassigned ones it reads as [UNK], a token each)."""
    chars = set(_JOINING) | {0xFFFD}
    for plane in (range(0x20000), range(0xE0000, 0xE0200)):
        chars.update(c for c in plane if unicodedata.category(chr(c)) in ("Mn", "Cf"))
    spans: list[list[int]] = []
    for c in sorted(chars):
        if spans and spans[-1][1] == c - 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    spans += [[0xE000, 0xF8FF], [0xF0000, 0xFFFFD], [0x100000, 0x10FFFD]]  # private use
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in spans) + "]+")


_DELETED = _deleted_pattern()


def least_words(text: str) -> int:
    """How many words ``text`` holds that each make a token at least: those
    between whitespace, once the characters a tokenizer's normalizer deletes
    or joins words with are taken out (a tokenizer splits at whitespace, and
    further at punctuation). Prose under the character bound (25,600 for
    MiniLM, ~4,700 tokens) is thus refused without tokenizing: 256 such
    texts held the replica's loop for seconds before they were refused."""
    return len(_DELETED.sub("", text).split())


def pad_batches(model: Any, multiple: int = PAD_TO_MULTIPLE_OF) -> None:
    """Makes ``model``'s tokenizing modules pad each batch to a multiple of
    ``multiple`` tokens (padding is masked: the embeddings do not change).
    Not where the model's window is no such multiple: the tokenizer refuses
    to truncate to a length that padding would then overstep."""
    window = getattr(model, "max_seq_length", None)
    if not isinstance(window, int) or window % multiple:
        return
    for module in model:
        kwargs = getattr(module, "processing_kwargs", None)
        if isinstance(kwargs, dict):
            module.processing_kwargs = {**kwargs, "text": {**kwargs.get("text", {}), "pad_to_multiple_of": multiple}}


class EmbeddingPredictor:
    kind = "embedding"
    outputs: tuple[str, ...] = ("embedding",)

    def __init__(self, model: Any, dtype: str = "float32") -> None:
        self._model = model
        self.dtype = dtype  # what the weights run in
        self._tokenizer = model.tokenizer
        self.dimensions = int(model.get_embedding_dimension())
        self.max_tokens = int(model.max_seq_length)
        # The model's default prompt (a retrieval model's "query: ", say), which
        # sentence-transformers puts before every text it embeds: counted with it.
        named = getattr(model, "default_prompt_name", None)
        self._prompt: str = (getattr(model, "prompts", None) or {}).get(named, "") if named else ""
        # A bound before tokenizing, as vLLM's: a text longer than its window's
        # tokens can hold is refused without building its tokens (a 32 MiB
        # text takes ~10 GB and ~40 s of the replica's loop to tokenize).
        # Generous past vLLM's (window × longest vocabulary entry): WordPiece
        # drops whitespace and reads a word of up to 100 characters as one
        # token, so indented or padded text under the window is not refused.
        longest = max((len(token) for token in self._tokenizer.get_vocab()), default=1)
        self.max_chars = self.max_tokens * max(longest, WORD_CHARS)

    @classmethod
    def load(
        cls, path: str, device: str = "cpu", threads: int | None = None, dtype: str = "auto"
    ) -> EmbeddingPredictor:
        """Loads the model directory in ``dtype`` (see ``resolve_dtype``);
        ``threads`` sets torch's intra-op threads."""
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            torch.set_num_threads(threads)
        name = resolve_dtype(dtype, device)
        model = SentenceTransformer(
            path, device=device, local_files_only=True, model_kwargs={"dtype": getattr(torch, name)}
        )
        pad_batches(model)
        return cls(model, name)

    def inputs(self, instances: Sequence[Any], param: str, *, lone: bool = False) -> tuple[list[str], list[int]]:
        """The texts and each one's token count (special tokens included);
        errors name the text by its path (``param[index]``, ``param`` where ``lone``)."""

        def path(index: int) -> str:
            return param if lone else f"{param}[{index}]"

        for index, text in enumerate(instances):
            if not isinstance(text, str):
                raise InvalidRequestError(f"{path(index)} must be a string", param=path(index))
            if not text:
                raise InvalidRequestError(f"{path(index)} is an empty string", param=path(index))
            if len(text) > self.max_chars:
                raise ContextLengthExceededError(
                    f"{path(index)} has {len(text)} characters, more than the {self.max_chars} read "
                    f"for this model's maximum context length of {self.max_tokens} tokens. "
                    "Please shorten the input.",
                    param=path(index),
                )
            if (words := least_words(text)) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"{path(index)} has {words} words, each at least one token; this model's maximum context "
                    f"length is {self.max_tokens} tokens. Please shorten the input.",
                    param=path(index),
                )
        texts = list(instances)
        counts: list[int] = []
        # In parts, each checked before the next is tokenized: a text over the window is refused
        # without tokenizing the rest (words of 100 letters pass the bounds above, yet make
        # tens of tokens each, and WordPiece's time grows with each word's length squared).
        for start in range(0, len(texts), TOKENIZED_TEXTS):
            part = [self._prompt + text for text in texts[start : start + TOKENIZED_TEXTS]]
            counts += [len(ids) for ids in self._tokenizer(part)["input_ids"]]
            for index, count in enumerate(counts[start:], start):
                if count > self.max_tokens:
                    raise ContextLengthExceededError(
                        f"{path(index)} has {count} tokens; this model's maximum context "
                        f"length is {self.max_tokens} tokens. Please shorten the input.",
                        param=path(index),
                    )
        return texts, counts

    def size(self, inputs: tuple[list[str], list[int]]) -> int:
        return len(inputs[0])

    def predict(self, batch: Sequence[tuple[list[str], list[int]]]) -> list[list[Any]]:
        texts = [text for inputs in batch for text in inputs[0]]
        vectors = self.embed(texts)
        out, start = [], 0
        for inputs in batch:
            out.append(list(vectors[start : start + len(inputs[0])]))
            start += len(inputs[0])
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 embeddings, one row per text, as the model's pipeline makes them."""
        return np.asarray(
            self._model.encode(texts, batch_size=min(len(texts), FORWARD_TEXTS), convert_to_numpy=True),
            dtype=np.float32,
        )
