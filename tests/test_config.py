"""EngineConfig: each field declared once; its LORAX_* variable and its `serve` flag come from that declaration."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lorax_mlflow.cli import build_parser, engine_flag_values
from lorax_mlflow.engine.config import EngineConfig, engine_settings


def test_every_field_has_one_flag_and_one_environment_variable_in_the_serve_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    specs = list(engine_settings())
    assert [spec.name for spec in specs] == [f.name for f in fields(EngineConfig)]
    for spec in specs:
        assert spec.flag in help_text and spec.env_var in help_text


def test_environment_variables_are_parsed_by_the_fields_declared_kind(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAX_MAX_LORAS", "3")
    monkeypatch.setenv("LORAX_IN_PROCESS", "yes")
    monkeypatch.setenv("LORAX_TARGET_MODULES", "q_proj,v_proj")
    monkeypatch.setenv("LORAX_ADAPTER_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    config = EngineConfig(max_loras=8).with_env_overrides()
    assert config.max_loras == 3 and config.in_process is True
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.adapter_roots == [f"{tmp_path}/a", f"{tmp_path}/b"]
    monkeypatch.setenv("LORAX_IN_PROCESS", "maybe")
    with pytest.raises(ValueError, match="not a boolean"):
        EngineConfig().with_env_overrides()


def test_flags_given_become_overrides_and_the_others_stay_unset():
    args = build_parser().parse_args(["serve", "--max-loras", "2", "--adapter-root", "/x", "--adapter-root", "/y",
                                      "--target-modules", "q_proj,o_proj", "--no-in-process"])
    assert engine_flag_values(args) == {"max_loras": 2, "adapter_roots": ["/x", "/y"],
                                        "target_modules": ["q_proj", "o_proj"], "in_process": False}
    config = EngineConfig(max_loras=8, max_model_len=64).with_overrides(engine_flag_values(args))
    assert (config.max_loras, config.max_model_len, config.target_modules) == (2, 64, ("q_proj", "o_proj"))


def test_a_model_config_from_an_older_version_with_a_removed_field_still_loads():
    assert EngineConfig.from_dict({"seed": 0, "max_loras": 2}).max_loras == 2
    with pytest.raises(ValueError, match="unknown engine config keys"):
        EngineConfig.from_dict({"max_lorass": 2})
