"""gateway/config/lora.py: a model's adapters set the engine settings its
replicas start with (so that no adapter fails on its rank nor batches take
one adapter at a time), and only those settings restart the replicas: the
adapters themselves reach running replicas live."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import VLLMModelConfig, lora, parse_model
from models.llm.vllm_engine import VLLMEngine


def adapter(root: Path, name: str, rank: object) -> str:
    (root / name).mkdir()
    (root / name / "adapter_config.json").write_text(f'{{"peft_type": "LORA", "r": {rank}}}')
    return str(root / name)


def replicas_of(config: VLLMModelConfig) -> VLLMModelConfig:
    """The config a replica starts with (``gateway.app.model_deployment``)."""
    replica = parse_model(config.deployment_args())
    assert isinstance(replica, VLLMModelConfig)
    return replica


def test_vllm_starts_the_replicas_with_a_rank_limit_and_slots_that_fit_the_adapters(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    adapters = {"sql": adapter(tmp_path, "sql", 24), "chat": adapter(tmp_path, "chat", 8), "hub": "org/lora"}
    config = VLLMModelConfig(name="base", model="org/model", lora_adapters=adapters)
    replica = replicas_of(config)
    assert replica.lora_adapters == {}  # they come live (``replica_user_config``)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(VLLMEngine(replica).cli_args())
    engine = AsyncEngineArgs.from_cli_args(args)
    assert engine.enable_lora is True
    assert (engine.max_lora_rank, engine.max_loras) == (32, 4)  # the smallest limit above rank 24; 3 slots -> 4
    assert config.replica_user_config() == {"lora_adapters": adapters}


def test_an_adapter_change_restarts_replicas_only_past_the_rank_limit_or_the_slots(tmp_path: Path) -> None:
    def args(**adapters: str) -> dict[str, object]:
        return VLLMModelConfig(name="base", model="org/model", lora_adapters=adapters).deployment_args()

    r8, other_r8, r16 = adapter(tmp_path, "a", 8), adapter(tmp_path, "b", 8), adapter(tmp_path, "c", 16)
    assert args(a=r8) == args(b=other_r8) == args(a=other_r8)  # renamed, another source: live
    assert args(a=r8, b=other_r8) != args(a=r8)  # 2 slots, not 1: a restart
    assert args(a=r8, b=other_r8, c=r8) == args(a=r8, b=other_r8, c=r8, d=other_r8)  # 4 slots either way
    assert args(a=r8) != args(a=r16)  # rank limit 16, not 8
    assert args() != args(a=r8)  # the engine starts without LoRA, which costs every batch


def test_a_model_started_ready_for_adapters_takes_its_first_and_last_live(tmp_path: Path) -> None:
    ready = {"enable-lora": True, "max-lora-rank": 16, "max-loras": 4}

    def args(**adapters: str) -> dict[str, object]:
        return VLLMModelConfig(name="base", model="org/m", lora_adapters=adapters, engine_args=ready).deployment_args()

    assert args() == args(a=adapter(tmp_path, "a", 8)) == args(a=str(tmp_path / "a"), b="org/hub-lora")
    assert args()["engine_args"] == ready


def test_the_models_own_engine_args_win_and_no_adapters_add_nothing(tmp_path: Path) -> None:
    adapters = {"sql": adapter(tmp_path, "sql", 24)}
    assert lora.engine_settings(adapters, {"max-lora-rank": 64, "max-loras": 1}) == {"enable-lora": True}
    assert lora.engine_settings({}, {}) == {}
    assert "max-lora-rank" not in lora.engine_settings({"hub": "org/lora"}, {})  # its rank is not known: vLLM's
    given = VLLMModelConfig(name="b", model="org/m", lora_adapters=adapters, engine_args={"max-loras": 3})
    assert given.deployment_args()["engine_args"] == {"enable-lora": True, "max-lora-rank": 32, "max-loras": 3}


@pytest.mark.parametrize(("count", "slots"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16)])
def test_a_batch_has_a_power_of_two_adapter_slots(count: int, slots: int) -> None:
    assert lora.slots(count) == slots


def test_a_change_loads_what_is_new_or_moved_and_unloads_what_is_gone() -> None:
    load, unload = lora.changes({"a": "/a", "b": "/b", "c": "/c"}, {"a": "/a", "b": "/b2", "d": "/d"})
    assert (load, unload) == ({"b": "/b2", "d": "/d"}, ["c"])
    assert lora.changes({"a": "/a"}, {"a": "/a"}) == ({}, [])


@pytest.mark.parametrize(
    ("ranks", "limit"),
    [
        ([1], 1), ([2, 8], 8), ([9], 16), ([320], 320), ([600], 512), ([None], None),
        # Beside a hub adapter (its rank unknown): not below vLLM's 16, which it alone would get.
        ([8, None], 16), ([32, None], 32),
    ],
)
def test_the_rank_limit_is_the_smallest_vllm_takes(ranks: list[int | None], limit: int | None) -> None:
    assert lora.rank_limit(ranks) == limit


def test_a_rank_is_read_only_from_a_local_adapter_that_states_it(tmp_path: Path) -> None:
    assert lora.adapter_rank(Path(adapter(tmp_path, "a", 16))) == 16
    assert lora.adapter_rank(Path(adapter(tmp_path, "b", '"16"'))) is None
    assert lora.adapter_rank(Path(adapter(tmp_path, "c", "true"))) is None
    assert lora.adapter_rank(tmp_path / "missing") is None


def test_an_adapters_rank_is_its_largest_layers_as_vllm_weighs_it(tmp_path: Path) -> None:
    # vLLM refuses an adapter whose rank_pattern goes past max_lora_rank, whatever its r.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 8, "rank_pattern": {"q_proj": 32, "v_proj": 4}}')
    assert lora.adapter_rank(tmp_path / "a") == 32
    assert lora.rank_limit([lora.adapter_rank(tmp_path / "a")]) == 32
