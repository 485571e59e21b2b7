"""models/llm/lora.py: a model's adapters reach vLLM's command line so that
its start does not fail on their rank nor its batches take one at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import VLLMModelConfig
from models.llm import lora
from models.llm.vllm_engine import VLLMEngine


def adapter(root: Path, name: str, rank: object) -> str:
    (root / name).mkdir()
    (root / name / "adapter_config.json").write_text(f'{{"peft_type": "LORA", "r": {rank}}}')
    return str(root / name)


def test_vllm_parses_the_adapters_with_a_rank_limit_that_fits_them_all(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    adapters = {"sql": adapter(tmp_path, "sql", 24), "chat": adapter(tmp_path, "chat", 8), "hub": "org/lora"}
    config = VLLMModelConfig(name="base", model="org/model", lora_adapters=adapters)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(VLLMEngine(config).cli_args())
    engine = AsyncEngineArgs.from_cli_args(args)
    assert engine.enable_lora is True
    assert (engine.max_lora_rank, engine.max_loras) == (32, 3)  # the smallest limit above rank 24; all in one batch
    assert {module.name: module.path for module in args.lora_modules} == adapters


def test_the_models_own_engine_args_win_and_no_adapters_add_nothing(tmp_path: Path) -> None:
    adapters = {"sql": adapter(tmp_path, "sql", 24)}
    args = lora.engine_args(adapters, {"max-lora-rank": 64, "max-loras": 1})
    assert args == ["--enable-lora", "--lora-modules", f"sql={adapters['sql']}"]
    assert lora.engine_args({}, {}) == []
    assert "--max-lora-rank" not in lora.engine_args({"hub": "org/lora"}, {})  # its rank is not known here: vLLM's default


@pytest.mark.parametrize(("ranks", "limit"), [([1], 1), ([2, 8], 8), ([9], 16), ([320], 320), ([600], 512), ([None], None)])
def test_the_rank_limit_is_the_smallest_vllm_takes(ranks: list[int | None], limit: int | None) -> None:
    assert lora.rank_limit(ranks) == limit


def test_a_rank_is_read_only_from_a_local_adapter_that_states_it(tmp_path: Path) -> None:
    assert lora.adapter_rank(Path(adapter(tmp_path, "a", 16))) == 16
    assert lora.adapter_rank(Path(adapter(tmp_path, "b", '"16"'))) is None
    assert lora.adapter_rank(Path(adapter(tmp_path, "c", "true"))) is None
    assert lora.adapter_rank(tmp_path / "missing") is None
