"""Command-line flags from the settings classes (``model.settings_cli``): one definition per setting, read back
as flag > environment variable > default, handed to child processes as environment variables."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Annotated, Literal

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.settings import Settings
from model.settings_cli import (Cli, SettingsError, add_settings_flags, env_names, parse_settings,
                                settings_environment, settings_from_args)
from rollout.settings import RolloutSettings
from serving.settings import ServingSettings
from webapp.settings import WebSettings

SETTINGS_CLASSES = (Settings, ServingSettings, WebSettings, RolloutSettings)


class OneLineError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise OneLineError(message)


def parser_for(settings_cls, style: str = "-", **options) -> Parser:
    parser = Parser(prog="test")
    add_settings_flags(parser, settings_cls, style=style, **options)
    return parser


@pytest.fixture
def clean_env(monkeypatch):
    """No PNEUMOSCOPE_* (or MLflow/kube) variable from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("PNEUMOSCOPE_") or name in ("MLFLOW_TRACKING_URI", "KUBECONFIG"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("settings_cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_every_setting_has_a_flag_with_its_description_as_help(settings_cls):
    parser = parser_for(settings_cls)
    helps = {action.dest: action.help for action in parser._actions}
    for name, info in settings_cls.model_fields.items():
        if any(isinstance(m, Cli) and m.env_only for m in info.metadata):
            assert name not in helps, f"{name} is environment-only"
            continue
        assert info.description and helps[name].startswith(info.description.replace("%", "%%")), name
        assert env_names(settings_cls, name)[0] in helps[name], name


def test_a_setting_without_description_is_refused():
    class Undocumented(BaseSettings):
        size: int = 3

    with pytest.raises(TypeError, match="Undocumented.size has no description"):
        parser_for(Undocumented)


def test_flag_over_environment_over_default(clean_env):
    clean_env.setenv("PNEUMOSCOPE_MAX_BATCH_SIZE", "4")
    clean_env.setenv("PNEUMOSCOPE_ENGINE", "openvino")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    parser = parser_for(ServingSettings)
    settings = settings_from_args(ServingSettings, parser.parse_args(
        ["--max-batch-size", "2", "--mlflow-tracking-uri", "http://from-flag:5000"]))
    assert settings.max_batch_size == 2 and settings.mlflow_tracking_uri == "http://from-flag:5000"  # flags
    assert settings.engine == "openvino"  # environment
    assert settings.threads is None and settings.precision == "auto"  # defaults
    assert settings_from_args(ServingSettings, parser.parse_args([])).max_batch_size == 4


def test_older_spellings_keep_working_in_both_styles(clean_env):
    dashed = parser_for(ServingSettings).parse_args(["--drain-seconds", "5", "--mlflow-uri", "u", "--sha256", "ab"])
    underscored = parser_for(ServingSettings, style="_").parse_args(
        ["--drain_timeout_s=5", "--mlflow_tracking_uri=u", "--sha256=ab"])
    for args in (dashed, underscored):
        settings = settings_from_args(ServingSettings, args)
        assert (settings.drain_timeout_s, settings.mlflow_tracking_uri, settings.model_sha256) == (5.0, "u", "ab")
    rollout = settings_from_args(RolloutSettings, parser_for(RolloutSettings).parse_args(
        ["--name", "isvc", "--context", "ctx", "--timeout", "7", "--window", "5m"]))
    assert (rollout.inference_service, rollout.kube_context, rollout.timeout_s, rollout.analysis_window) == \
        ("isvc", "ctx", 7.0, "5m")


def test_bools_choices_and_types(clean_env):
    parser = parser_for(WebSettings)
    assert settings_from_args(WebSettings, parser.parse_args(["--no-deidentify-dicom"])).deidentify_dicom is False
    clean_env.setenv("PNEUMOSCOPE_ACCESS_LOG", "true")
    assert settings_from_args(WebSettings, parser.parse_args([])).access_log is True
    assert settings_from_args(WebSettings, parser.parse_args(["--no-access-log"])).access_log is False
    with pytest.raises(OneLineError, match="invalid choice: 'sometimes'"):
        parser.parse_args(["--cookie-secure", "sometimes"])
    with pytest.raises(OneLineError, match="invalid int value"):
        parser.parse_args(["--port", "eighty"])
    with pytest.raises(OneLineError, match="unrecognized arguments: --secret-key"):
        parser.parse_args(["--secret-key", "visible-in-ps"])  # environment only


def test_only_and_exclude_pick_the_flags():
    parser = parser_for(WebSettings, only=("home", "database_url"))
    assert {a.dest for a in parser._actions} == {"help", "home", "database_url"}
    assert "model_cache" not in {a.dest for a in parser_for(ServingSettings, exclude=("model_cache",))._actions}
    with pytest.raises(ValueError, match="no field nonsense"):
        parser_for(WebSettings, only=("nonsense",))


def test_an_invalid_value_is_one_line_naming_flag_and_variable(clean_env):
    parser = parser_for(ServingSettings)
    with pytest.raises(SettingsError) as flag:
        settings_from_args(ServingSettings, parser.parse_args(["--max-batch-size", "0"]))
    clean_env.setenv("PNEUMOSCOPE_PRECISION", "fp16")
    with pytest.raises(SettingsError) as env:
        settings_from_args(ServingSettings, parser.parse_args([]))
    assert str(flag.value) == ("invalid setting max_batch_size (--max-batch-size or PNEUMOSCOPE_MAX_BATCH_SIZE): "
                               "Input should be greater than or equal to 1")
    assert str(env.value).startswith("invalid setting precision (--precision or PNEUMOSCOPE_PRECISION): ")
    assert "\n" not in str(env.value)


def test_a_flag_the_parser_already_has_is_adopted(clean_env):
    """KServe's ModelServer parser already has --model_name and --predictor_protocol, with its own defaults."""
    def kserve_like():
        parser = Parser(prog="predictor")
        parser.add_argument("--model_name", default="model")
        parser.add_argument("--predictor_protocol", default="v1", choices=["v1", "v2", "grpc-v2"])
        return parser

    args, settings = parse_settings(kserve_like(), ServingSettings, [])
    assert args.model_name == settings.model_name == "pneumonia"  # the setting's default, not kserve's
    clean_env.setenv("PNEUMOSCOPE_MODEL_NAME", "from-env")
    args, settings = parse_settings(kserve_like(), ServingSettings, ["--max_batch_size=3"])
    assert args.model_name == settings.model_name == "from-env" and settings.max_batch_size == 3
    args, settings = parse_settings(kserve_like(), ServingSettings, ["--model_name=from-flag"])
    assert args.model_name == settings.model_name == "from-flag"
    with pytest.raises(OneLineError, match="invalid setting predictor_protocol"):
        parse_settings(kserve_like(), ServingSettings, ["--predictor_protocol=v1"])  # kserve's choice, not ours
    with pytest.raises(argparse.ArgumentError):  # without adopt, a clash is a programming error
        add_settings_flags(kserve_like(), ServingSettings, style="_")


def test_a_child_process_reads_exactly_the_settings_it_is_given(clean_env, tmp_path):
    """Through the environment alone, in a real child process; a field that is None removes its variable."""
    settings = ServingSettings(max_batch_size=3, engine="onnxruntime", spinning=True, decode_threads=None,
                               mlflow_tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", drain_timeout_s=2.5)
    env = settings_environment(settings, base={"PATH": os.environ["PATH"], "PNEUMOSCOPE_DECODE_THREADS": "9",
                                               "PNEUMOSCOPE_MLFLOW_TRACKING_URI": "stale"})
    assert "PNEUMOSCOPE_DECODE_THREADS" not in env and "PNEUMOSCOPE_MLFLOW_TRACKING_URI" not in env
    assert env["PNEUMOSCOPE_SPINNING"] == "true" and env["MLFLOW_TRACKING_URI"] == settings.mlflow_tracking_uri
    code = "from serving.settings import ServingSettings; print(ServingSettings().model_dump_json())"
    child = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                           capture_output=True, text=True, timeout=60, check=True)
    assert ServingSettings.model_validate_json(child.stdout) == settings


def test_a_new_setting_is_one_line(clean_env):
    """The point of the helper: a field, and its flag, help, environment variable and child hand-over follow."""
    class Grown(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_", extra="ignore")
        colour: Annotated[Literal["red", "blue"], Cli(aliases=("hue",))] = Field("red", description="a colour")

    settings = settings_from_args(Grown, parser_for(Grown).parse_args(["--hue", "blue"]))
    assert settings.colour == "blue" and settings_environment(settings, base={})["PNEUMOSCOPE_COLOUR"] == "blue"
