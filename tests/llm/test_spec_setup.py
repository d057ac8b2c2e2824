"""Speculation options: how flags and repository parameters become a SpecConfig, and how a repository LLM inherits
the server's flags (unset fields only; `none` opts out; a relative draft path is the model directory's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ladle.config import LLMConfig
from ladle.llm.spec.policy import SpecConfig
from ladle.llm.spec.setup import spec_config
from ladle.repository.model_config import ConfigError
from ladle.serving.builders import llm_config_from_parameters, llm_parameters


def test_off_unless_asked() -> None:
    assert spec_config(LLMConfig()) is None
    assert spec_config(LLMConfig(speculative_method="none", num_speculative_tokens=3)) is None


def test_ngram_defaults_and_overrides() -> None:
    assert spec_config(LLMConfig(speculative_method="ngram")) == SpecConfig("ngram", 4, 2, 4, None)
    assert spec_config(LLMConfig(speculative_method="ngram", num_speculative_tokens=6, ngram_min=1, ngram_max=3)) == \
        SpecConfig("ngram", 6, 1, 3, None)


def test_a_draft_model_implies_its_method() -> None:
    assert spec_config(LLMConfig(speculative_model="/d")) == SpecConfig("draft_model", 4, 2, 4, "/d")
    with pytest.raises(ValueError, match="speculative_model"):
        spec_config(LLMConfig(speculative_method="draft_model"))


@pytest.mark.parametrize(("options", "message"), [
    ({"speculative_method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"speculative_method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min"),
    ({"speculative_method": "medusa"}, "speculative_method"),
])
def test_bad_options_say_which(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_config(LLMConfig(**options))


def test_repository_llms_inherit_only_what_they_leave_unset(tmp_path: Path) -> None:
    server = LLMConfig(speculative_method="ngram", num_speculative_tokens=6, ngram_max=5)
    plain = llm_config_from_parameters({}, tmp_path / "1", str(tmp_path), server)
    assert (plain.speculative_method, plain.num_speculative_tokens, plain.ngram_max) == ("ngram", 6, 5)
    own = llm_config_from_parameters({"num_speculative_tokens": 2}, tmp_path / "1", str(tmp_path), server)
    assert (own.speculative_method, own.num_speculative_tokens) == ("ngram", 2)
    opted_out = llm_config_from_parameters({"speculative_method": "none"}, tmp_path / "1", str(tmp_path), server)
    assert spec_config(opted_out) is None
    alone = llm_config_from_parameters({}, tmp_path / "1", str(tmp_path), None)
    assert spec_config(alone) is None


def test_a_relative_draft_is_read_from_the_model_directory(tmp_path: Path) -> None:
    config = llm_config_from_parameters({"speculative_model": "draft"}, tmp_path / "1", str(tmp_path))
    assert config.speculative_model == str(tmp_path / "draft")
    absolute = llm_config_from_parameters({"speculative_model": "/abs/d"}, tmp_path / "1", str(tmp_path))
    assert absolute.speculative_model == "/abs/d"


def test_a_flag_draft_is_relative_to_the_working_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert llm_parameters(LLMConfig(model="m", speculative_model="d"))["speculative_model"] == str(tmp_path / "d")


def test_unknown_parameters_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="speculative_tokens"):
        llm_config_from_parameters({"speculative_tokens": 3}, tmp_path / "1", str(tmp_path))
