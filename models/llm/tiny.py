"""Builds the small local chat models the default config serves.

No model hub is reachable where the gateway is developed and tested, so the
models it serves out of the box are written here: a Llama-architecture
checkpoint with a byte-level BPE tokenizer trained on ``corpus.txt`` and a
ChatML chat template that can render tools. Everything derives from a seed, so
two builds with the same seed are byte-for-byte the same model, and two seeds
give two distinguishable versions for A/B rollouts.

The result is an ordinary Hugging Face model directory: vLLM loads it exactly
as it loads any hub model, so replacing ``model:`` in a config with a real
model id is the only change a GPU deployment needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_Spec = TypeVar("_Spec", bound=_Named)

CORPUS = Path(__file__).with_name("corpus.txt")

SPECIAL_TOKENS = ("<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

# ChatML. Tools are listed in the system turn and earlier tool calls are
# rendered back, so vLLM's tool_choice (named or "required") has a prompt to
# work with. Content may be a string or a list of OpenAI text parts.
CHAT_TEMPLATE = (
    # Every tag strips whitespace and newlines are written as {{ nl }}, so the
    # output is the same under any whitespace settings (transformers renders
    # with trim_blocks and lstrip_blocks).
    "{%- set nl = '\\n' -%}"
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "<|im_start|>system{{ nl }}You can call these functions:"
    "{%- for tool in tools -%}{{ nl }}{{ tool | tojson }}{%- endfor -%}"
    "{{ nl }}<|im_end|>{{ nl }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}{{ nl }}{{ text(message.content) }}"
    "{%- if message.tool_calls -%}{%- for call in message.tool_calls -%}"
    "<tool_call>{{ call.function | tojson }}</tool_call>"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ nl }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ nl }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the built model. head_dim is 64: vLLM's CPU attention rejects 16."""

    name: str
    seed: int
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    train_steps: int = 150


TINY_CHAT_MODELS = (
    TinyModelSpec(name="tiny-chat-v1", seed=1),
    TinyModelSpec(name="tiny-chat-v2", seed=2),
)


def is_built(path: Path) -> bool:
    """True when ``path`` holds a complete build (weights are written last)."""
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def build_tiny_chat(spec: TinyModelSpec, out_dir: Path) -> Path:
    """Writes the model described by ``spec`` into ``out_dir`` and returns it."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    text = CORPUS.read_text(encoding="utf-8")
    tokenizer = _train_tokenizer(text, spec)
    tokenizer.save_pretrained(out_dir)
    _write_tokenizer_config(out_dir, tokenizer)

    torch.manual_seed(spec.seed)
    model = _init_model(spec, tokenizer)
    _train(model, tokenizer(text)["input_ids"], spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    logger.info("built %s (seed %d) in %s", spec.name, spec.seed, out_dir)
    return out_dir


def build_all(root: Path, *, force: bool = False) -> list[Path]:
    """Builds every missing tiny chat model under ``root``; returns their paths."""
    return build_missing(root, TINY_CHAT_MODELS, "model", is_built, build_tiny_chat, force=force)


def build_missing(
    root: Path,
    specs: Sequence[_Spec],
    what: str,
    built: Callable[[Path], bool],
    build: Callable[[_Spec, Path], Path],
    *,
    force: bool = False,
) -> list[Path]:
    """Builds each of ``specs`` (named ``spec.name``) under ``root`` that is
    not ``built`` there yet; returns their paths."""
    paths = []
    for spec in specs:
        path = root / spec.name
        if force or not built(path):
            print(f"building local {what} {spec.name} in {path} ...", flush=True)
            build(spec, path)
        paths.append(path)
    return paths


def _train_tokenizer(text: str, spec: TinyModelSpec):  # noqa: ANN202
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        model_max_length=spec.max_position_embeddings,
    )


def _write_tokenizer_config(out_dir: Path, tokenizer) -> None:  # noqa: ANN001
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)


def _init_model(spec: TinyModelSpec, tokenizer):  # noqa: ANN001, ANN202
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|end_of_text|>")]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
    )
    return model


def _train(model, ids: list[int], spec: TinyModelSpec) -> None:  # noqa: ANN001
    """A few steps of next-token training so samples look like the corpus."""
    import torch

    data = torch.tensor(ids, dtype=torch.long)
    window, batch = 64, 16
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(spec.train_steps):
        starts = torch.randint(0, len(data) - window - 1, (batch,), generator=generator)
        inputs = torch.stack([data[s : s + window] for s in starts])
        loss = model(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    logger.info("%s: final training loss %.3f", spec.name, float(loss))
