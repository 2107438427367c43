"""vllm_sim.cli and vllm_sim.config: vLLM's flag surface and the VLLM_SIM_* knobs."""

from __future__ import annotations

import pytest

from vllm_sim.cli import parse_args
from vllm_sim.config import ConfigError, Knobs

pytestmark = pytest.mark.unit


def test_defaults_are_vllms() -> None:
    config, non_default = parse_args([], {})
    assert config.model == "facebook/opt-125m"
    assert config.served_model_names == ("facebook/opt-125m",)
    assert (config.host, config.port) == ("0.0.0.0", 8000)
    assert config.max_model_len == 2048
    assert not config.sleep_endpoints
    assert non_default == {}


def test_served_names_and_flag_spellings() -> None:
    config, non_default = parse_args(
        ["--model=/m", "--served-model-name", "a", "b", "--max_model_len", "2K",
         "--port=9001", "--enable-sleep-mode", "--no-enable-prefix-caching", "-tp", "2",
         "--api-key", "k"], {})
    assert config.model == "/m" and config.served_model_names == ("a", "b")
    assert config.model_label == "a"
    assert config.max_model_len == 2048 and config.port == 9001
    assert config.sleep_endpoints and config.api_key == "k"
    assert non_default["api_key"] == "******"
    assert non_default["tensor_parallel_size"] == 2


def test_positional_model_like_vllm_serve() -> None:
    config, _ = parse_args(["/models/x", "--port", "1"], {})
    assert config.model == "/models/x" and config.served_model_names == ("/models/x",)


@pytest.mark.parametrize("argv", [["--bogus"], ["--port", "x"], ["--max-model-len", "0"],
                                  ["--uvicorn-log-level", "loud"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, {})
    assert exc.value.code == 2
    assert "usage: vllm serve" in capsys.readouterr().err


def test_knobs_from_env() -> None:
    knobs = Knobs.from_env({"VLLM_SIM_TTFT_MS": "20", "VLLM_SIM_ITL_MS": "5.5",
                            "VLLM_SIM_LOAD_SECONDS": "2", "VLLM_SIM_FAIL_AT_START": "1",
                            "VLLM_SIM_MAX_TOKENS_DEFAULT": "7", "VLLM_SERVER_DEV_MODE": "1"})
    assert (knobs.ttft_s, knobs.itl_s, knobs.load_seconds) == (0.02, 0.0055, 2.0)
    assert knobs.fail_at_start and knobs.dev_mode and knobs.max_tokens_default == 7
    assert not Knobs.from_env({"VLLM_SIM_FAIL_AT_START": "0"}).fail_at_start


@pytest.mark.parametrize("env", [{"VLLM_SIM_ITL_MS": "fast"}, {"VLLM_SIM_TTFT_MS": "-1"},
                                 {"VLLM_SIM_MAX_TOKENS_DEFAULT": "0"}])
def test_bad_knobs_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Knobs.from_env(env)


def test_bad_knob_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args([], {"VLLM_SIM_ITL_MS": "fast"})
    assert exc.value.code == 2
    assert "VLLM_SIM_ITL_MS" in capsys.readouterr().err
