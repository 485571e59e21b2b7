"""models/llm/vllm_contract.py: what the gateway uses of vLLM's serving layer is there."""

from __future__ import annotations

import pytest

from models.llm import vllm_contract


def test_the_installed_vllm_has_everything_the_gateway_uses() -> None:
    # Fails loudly on a vLLM upgrade that moves or renames what the compatibility module relies on.
    assert vllm_contract.check_contract() == []


def test_the_contract_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        vllm_contract,
        "CONTRACT",
        (
            ("vllm.v1.engine.async_llm", "AsyncLLM.generate_everything", ()),
            ("vllm.v1.engine.async_llm", "AsyncLLM.generate", ("prompt", "no_such_parameter")),
            ("vllm.no_such_module", "anything", ()),
        ),
    )
    problems = vllm_contract.check_contract()
    assert len(problems) == 3
    assert "AsyncLLM.generate_everything: no generate_everything" in problems[0]
    assert "no parameter no_such_parameter" in problems[1]
    assert "vllm.no_such_module: cannot be imported" in problems[2]
