"""The simulator's settings: vLLM's flag values plus the simulation knobs from the environment.

Knobs (environment variables; flags stay vLLM's own):

| variable | default | meaning |
|---|---|---|
| `VLLM_SIM_LOAD_SECONDS` | 0 | "model loading" time before the port is bound |
| `VLLM_SIM_TTFT_MS` | 0 | delay from admission to the first token |
| `VLLM_SIM_ITL_MS` | 0 | delay between two tokens |
| `VLLM_SIM_FAIL_AT_START` | unset | if set (not "0"/"false"): after the load delay, print an engine error and exit 1 |
| `VLLM_SIM_MAX_TOKENS_DEFAULT` | 16 | tokens generated when a request gives no `max_tokens` |
| `VLLM_SIM_OUTPUT_TOKEN` | unset | the token text to repeat (default: " " + the first word of the prompt, or " hello") |
| `VLLM_SIM_SLEEP_MS` | 0 | how long `POST /sleep` takes |
| `VLLM_SIM_WAKE_MS` | 0 | how long `POST /wake_up` takes |
| `VLLM_SIM_EMBEDDING_DIM` | 32 | length of `/v1/embeddings` vectors |
| `VLLM_SIM_ACCESS_LOG` | 0 | uvicorn access log (vLLM has it on; off here to keep the hot path lean) |
| `VLLM_SERVER_DEV_MODE` | 0 | vLLM's own: with it (or `--enable-sleep-mode`) the sleep endpoints answer |
| `VLLM_API_KEY` | unset | vLLM's own: same as `--api-key` |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

VLLM_VERSION = "0.32.0"


class ConfigError(ValueError):
    """A knob or flag value the simulator cannot use."""


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be at least 1")
    return value


@dataclass(frozen=True)
class Knobs:
    """Simulation behaviour, read from the environment (see the module docstring)."""

    load_seconds: float = 0.0
    ttft_s: float = 0.0
    itl_s: float = 0.0
    fail_at_start: bool = False
    max_tokens_default: int = 16
    output_token: str | None = None
    sleep_s: float = 0.0
    wake_s: float = 0.0
    embedding_dim: int = 32
    access_log: bool = False
    dev_mode: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Knobs:
        token = environ.get("VLLM_SIM_OUTPUT_TOKEN")
        return cls(
            load_seconds=_float(environ, "VLLM_SIM_LOAD_SECONDS", 0.0),
            ttft_s=_float(environ, "VLLM_SIM_TTFT_MS", 0.0) / 1000.0,
            itl_s=_float(environ, "VLLM_SIM_ITL_MS", 0.0) / 1000.0,
            fail_at_start=_truthy(environ.get("VLLM_SIM_FAIL_AT_START")),
            max_tokens_default=_int(environ, "VLLM_SIM_MAX_TOKENS_DEFAULT", 16),
            output_token=token if token else None,
            sleep_s=_float(environ, "VLLM_SIM_SLEEP_MS", 0.0) / 1000.0,
            wake_s=_float(environ, "VLLM_SIM_WAKE_MS", 0.0) / 1000.0,
            embedding_dim=_int(environ, "VLLM_SIM_EMBEDDING_DIM", 32),
            access_log=_truthy(environ.get("VLLM_SIM_ACCESS_LOG")),
            dev_mode=_truthy(environ.get("VLLM_SERVER_DEV_MODE")),
        )


@dataclass(frozen=True)
class SimConfig:
    """Everything the server needs: the vLLM flags that matter plus the knobs."""

    model: str = "facebook/opt-125m"
    served_model_names: tuple[str, ...] = ("facebook/opt-125m",)
    host: str = "0.0.0.0"
    port: int = 8000
    max_model_len: int = 2048
    max_num_seqs: int = 256
    enable_sleep_mode: bool = False
    api_key: str | None = None
    uvicorn_log_level: str = "info"
    knobs: Knobs = Knobs()

    @property
    def sleep_endpoints(self) -> bool:
        """Whether /sleep, /wake_up and /is_sleeping answer (else 404)."""
        return self.enable_sleep_mode or self.knobs.dev_mode

    @property
    def model_label(self) -> str:
        """The `model_name` label of the metrics: the first served name, as in vLLM."""
        return self.served_model_names[0]
