"""`python -m vllm_sim` / `vllm-sim`: start the simulator with `vllm serve`'s flags.

The flag surface is vLLM's (unknown flags: usage error, exit 2); the flags that change what a
client sees are honoured (`--model`, `--served-model-name`, `--host`, `--port`,
`--max-model-len`, `--max-num-seqs`, `--enable-sleep-mode`, `--api-key`,
`--uvicorn-log-level`), the others are accepted and ignored. Simulation knobs come from the
environment: see `vllm_sim.config` (VLLM_SIM_LOAD_SECONDS, VLLM_SIM_TTFT_MS, VLLM_SIM_ITL_MS,
VLLM_SIM_FAIL_AT_START, VLLM_SIM_MAX_TOKENS_DEFAULT, VLLM_SIM_OUTPUT_TOKEN,
VLLM_SIM_SLEEP_MS, VLLM_SIM_WAKE_MS, VLLM_SIM_EMBEDDING_DIM, VLLM_SIM_ACCESS_LOG).

Startup, like vLLM: log lines on stdout ("vLLM API server version 0.32.0", the non-default
args, "Starting vLLM API server 0 on http://HOST:PORT"), the port bound only after the load
delay (VLLM_SIM_LOAD_SECONDS), SIGTERM during loading exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_sim.config import VLLM_VERSION, ConfigError, Knobs, SimConfig

DEFAULT_MODEL = "facebook/opt-125m"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _model_len(value: str) -> int:
    """vLLM's human-readable lengths: 2048, 2k, 2K (x1000 / x1024), 1m, 1M."""
    raw = value.strip()
    factors = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}
    try:
        if raw and raw[-1] in factors:
            result = int(float(raw[:-1]) * factors[raw[-1]])
        else:
            result = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length: {value!r}") from None
    if result < 1:
        raise argparse.ArgumentTypeError(f"length must be positive: {value!r}")
    return result


def _sim_version() -> str:
    from fleet.version import version  # the project's version (vllm-sim ships in it)

    return version()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm serve",
        description="vLLM OpenAI-Compatible RESTful API server (simulated).",
        allow_abbrev=False,
    )
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--version", action="version", version=f"vllm-sim {_sim_version()} "
                   f"(vllm-fleet), simulating vLLM {VLLM_VERSION}")
    p.add_argument("model_tag", nargs="?", default=None, help="the model (same as --model)")
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uvicorn-log-level", choices=_LOG_LEVELS, default="info")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-model-len", type=_model_len, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--enable-sleep-mode", action=bool_flag, default=False)
    # Accepted and ignored: they change the engine, not what a client sees.
    for flag in ("--gpu-memory-utilization", "--swap-space", "--cpu-offload-gb",
                 "--kv-cache-memory-bytes"):
        p.add_argument(flag, type=float, default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-logprobs", type=int, default=None)
    p.add_argument("--max-log-len", type=int, default=None)
    for flag in ("--dtype", "--runner", "--task", "--convert", "--tokenizer", "--revision",
                 "--tokenizer-mode", "--download-dir", "--load-format", "--kv-cache-dtype",
                 "--generation-config", "--chat-template",
                 "--tool-call-parser", "--reasoning-parser", "--distributed-executor-backend",
                 "--root-path", "--hf-overrides", "--override-generation-config",
                 "--limit-mm-per-prompt", "--compilation-config", "--kv-transfer-config",
                 "--config", "--response-role", "--ssl-keyfile", "--ssl-certfile",
                 "--allowed-origins", "--allowed-methods", "--allowed-headers",
                 "--middleware", "--lora-modules", "--chat-template-content-format",
                 "--tokenizer-revision", "--code-revision", "--device", "--logits-processors"):
        p.add_argument(flag, default=None)
    p.add_argument("--quantization", "-q", default=None)
    for flag in ("--trust-remote-code", "--enforce-eager", "--enable-prefix-caching",
                 "--enable-chunked-prefill", "--enable-auto-tool-choice", "--enable-lora",
                 "--disable-log-stats", "--enable-log-requests", "--disable-log-requests",
                 "--disable-frontend-multiprocessing", "--allow-credentials",
                 "--enable-server-load-tracking", "--enable-request-id-headers",
                 "--disable-fastapi-docs", "--enable-prompt-tokens-details",
                 "--enable-force-include-usage", "--headless", "--skip-tokenizer-init",
                 "--disable-custom-all-reduce", "--async-scheduling"):
        p.add_argument(flag, action=bool_flag, default=None)
    return p


def _normalise(argv: Sequence[str]) -> list[str]:
    """vLLM accepts `--flag_name` for `--flag-name`; do the same."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[SimConfig, dict[str, Any]]:
    """(config, the non-default args as vLLM logs them); exits 2 on a usage error."""
    parser = build_parser()
    ns = parser.parse_args(_normalise(argv))
    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        parser.error("both a positional model and --model were given and they differ")
    model = ns.model_tag or ns.model or DEFAULT_MODEL
    names = tuple(ns.served_model_name) if ns.served_model_name else (model,)
    try:
        knobs = Knobs.from_env(environ)
    except ConfigError as exc:
        parser.error(str(exc))
    config = SimConfig(
        model=model,
        served_model_names=names,
        host=ns.host if ns.host is not None else "0.0.0.0",
        port=ns.port,
        max_model_len=ns.max_model_len if ns.max_model_len is not None else 2048,
        max_num_seqs=ns.max_num_seqs if ns.max_num_seqs is not None else 256,
        enable_sleep_mode=bool(ns.enable_sleep_mode),
        api_key=ns.api_key or environ.get("VLLM_API_KEY") or None,
        uvicorn_log_level=ns.uvicorn_log_level,
        knobs=knobs,
    )
    defaults = vars(parser.parse_args([]))
    non_default = {k: v for k, v in vars(ns).items() if v != defaults.get(k)}
    non_default.pop("model_tag", None)
    if "api_key" in non_default:
        non_default["api_key"] = "******"
    return config, non_default


def _log(level: str, where: str, message: str) -> None:
    """A log line in vLLM's format, on stdout as vLLM writes it."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"{level} {stamp} [{where}] {message}", flush=True)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve(config: SimConfig, sock: socket.socket) -> None:
    import uvicorn

    from vllm_sim.app import SimApp

    app = SimApp(config)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Finish requests in flight at once (their streams end) so shutdown is quick.
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(app.engine.abort_all, "shutdown")
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(
        app,
        log_level=config.uvicorn_log_level,
        access_log=config.knobs.access_log,
        lifespan="on",
        timeout_graceful_shutdown=3,
        timeout_keep_alive=5,
        loop="auto",
        http="auto",
    )
    _Server(uv_config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config, non_default = parse_args(args, os.environ)
    knobs = config.knobs

    def _on_term(signum: int, frame: Any) -> None:
        _log("INFO", "launcher.py:80", "Shutting down during startup.")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    _log("INFO", "api_server.py:1896", f"vLLM API server version {VLLM_VERSION}")
    _log("INFO", "utils.py:328", f"non-default args: {non_default}")
    _log("INFO", "model.py:631", f"Resolved architecture: simulator (model {config.model!r})")
    _log("INFO", "model.py:1745", f"Using max model len {config.max_model_len}")
    if knobs.load_seconds > 0:
        _log("INFO", "gpu_model_runner.py:2602", "Starting to load model "
             f"{config.model}... (simulated, {knobs.load_seconds:g} s)")
        time.sleep(knobs.load_seconds)
    if knobs.fail_at_start:
        print(f"ERROR {time.strftime('%m-%d %H:%M:%S')} [core.py:708] EngineCore failed to "
              "start (VLLM_SIM_FAIL_AT_START).", file=sys.stderr, flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above. "
              "Failed core proc(s): {}", file=sys.stderr, flush=True)
        return 1
    _log("INFO", "gpu_model_runner.py:2653", f"Model loading took 0.0000 GiB and "
         f"{knobs.load_seconds:.6f} seconds")
    try:
        sock = _bind(config.host, config.port)
    except OSError as exc:
        print(f"ERROR {time.strftime('%m-%d %H:%M:%S')} [api_server.py:1850] "
              f"[Errno {exc.errno}] error while attempting to bind on address "
              f"({config.host!r}, {config.port}): {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    port = sock.getsockname()[1]
    _log("INFO", "api_server.py:1971", f"Starting vLLM API server 0 on "
         f"http://{config.host}:{port}")
    _log("INFO", "launcher.py:37", "Available routes are: /health, /v1/models, "
         "/v1/chat/completions, /v1/completions, /v1/embeddings, /tokenize, /detokenize, "
         "/metrics, /version, /load" + (", /sleep, /wake_up, /is_sleeping"
                                         if config.sleep_endpoints else ""))
    # uvicorn takes SIGTERM over while it serves and re-raises it once stopped: exit 0 then.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _serve(config, sock)
    return 0
