"""Gateway settings: `GATEWAY_*` environment variables, overridden by CLI flags."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Everything the gateway can be told; passed to `create_app`, never read globally."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    host: str = Field(default="127.0.0.1",
                      description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    registry: str | None = Field(
        default=None,
        validation_alias=AliasChoices("GATEWAY_REGISTRY", "FLEET_REGISTRY", "registry"),
        description="the registry file",
    )
    upstream_host: str = Field(
        default="127.0.0.1",
        description="host of managed models; 'service' inside compose or on a Swarm's "
                    "overlay network (vllm-<name>)",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds to connect to a model")
    read_timeout: float = Field(default=600.0, gt=0,
                                description="seconds a model may go silent (between bytes)")
    write_timeout: float = Field(default=60.0, gt=0,
                                 description="seconds a model may take to accept a request body")
    pool_timeout: float = Field(default=10.0, gt=0,
                                description="seconds to wait for a free connection to a model")
    max_connections: int = Field(default=512, ge=1,
                                 description="connections to each model instance (upstream)")
    max_keepalive: int = Field(default=64, ge=0, description="idle connections kept per instance")
    keepalive_expiry: float = Field(
        default=4.0, gt=0,
        description="idle pooled connections are dropped after this; below vLLM's 5 s "
                    "keep-alive so a connection is never reused just as vLLM closes it")
    upstream_client: Literal["aiohttp", "httpx", "h1"] = Field(
        default="httpx",
        description="HTTP client to the upstreams. `python -m gateway` uses h1 (the gateway's "
                    "own, gateway/h1.py; https models get aiohttp) unless this is set; the "
                    "library default stays httpx so respx-mocked apps work")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1,
                                description="largest request body accepted (then 413)")
    # Limits on the way in (gateway/server.py, gateway/body.py): what one client may make the
    # gateway hold before its request reaches a model.
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024,
        description="request line plus headers, in bytes (beyond: 431, connection closed)")
    max_header_count: int = Field(
        default=100, ge=1, description="header fields in one request (beyond: 431)")
    header_timeout: float = Field(
        default=10.0, gt=0,
        description="seconds a connection may take to send a request's line and headers "
                    "(from its first byte, or from the connection's start); then it is closed")
    body_timeout: float = Field(
        default=60.0, gt=0,
        description="seconds a request's body may take to arrive, from the end of its "
                    "headers; then 408 and the connection is closed")
    max_client_connections: int = Field(
        default=4096, ge=1,
        description="open client connections; beyond it the oldest idle one is closed, or, "
                    "when none is idle, the new one gets 503 (file descriptors are raised to fit)")
    max_buffered_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1,
        description="request body bytes held at once across all requests (beyond: 503 with "
                    "Retry-After)")
    health_timeout: float = Field(default=2.0, gt=0, description="probe timeout for listings")
    list_aliases: bool = Field(
        default=True, description="GET /v1/models lists each alias as an entry of its own "
                                  "(model pickers in chat UIs show them)")
    retry_after: int = Field(default=5, ge=1, description="Retry-After seconds on 503")
    log_level: str = Field(default="info", description="log level: debug, info, warning, error")
    access_log: bool = Field(
        default=False, description="one structured line per request (request id, model, status, "
                                   "duration, key name); uvicorn's own access log stays off")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text (key=value fields) or json (one object a line)")
    # Access (gateway/auth.py): API keys, the admin key, CORS, who may read /metrics.
    api_keys: SecretStr | None = Field(
        default=None, description="comma-separated API keys; none configured: the gateway is open")
    api_keys_file: str | None = Field(
        default=None, description="TOML/JSON file of [[keys]] key, name, models (allow-list)")
    admin_key: SecretStr | None = Field(
        default=None, description="key of the /admin endpoints; without it they answer 403")
    admin_key_file: str | None = Field(default=None, description="a file holding the admin key")
    cors_origins: str = Field(
        default="", description="comma-separated origins allowed by CORS, or *; empty: CORS off")
    direct_path: bool = Field(
        default=True, description="serve the common model request in the server's callbacks "
                                  "(no task, no ASGI cycle: less CPU, lower latency under load); "
                                  "false: every request takes the ASGI path")
    metrics_public: bool = Field(
        default=True, description="GET /metrics without a key; false: it needs the admin key")
    ui: Literal["loopback", "on", "off"] = Field(
        default="loopback", description="the dashboard at /ui: loopback (only to clients on this "
                                        "machine), on (everyone; data still behind the keys), off")
    # On-demand activation through the fleet (managed models only), idle ttl, replica probes.
    activation: bool = Field(default=True, description="wake/start models on demand via the fleet")
    activation_timeout: float = Field(default=600.0, gt=0, description="max wait for a model")
    idle_check_interval: float = Field(default=5.0, gt=0, description="idle ttl check period")
    probe_interval: float = Field(default=2.0, gt=0, description="re-probe ejected replicas")
    autoscale_interval: float = Field(default=5.0, gt=0, description="autoscaling sample period")
    # The scheduler (gateway/scheduler/): who holds the GPUs or cores, who waits, who drains.
    scheduler: Literal["fair", "drain-wait"] = Field(
        default="fair", description="fair: models take turns (drain after a quantum, longest "
        "wait next); drain-wait: the old behaviour (a switch waits for idleness), kept to compare")
    quantum_floor: float = Field(
        default=5.0, gt=0, description="least seconds a model keeps the resource while rivals wait")
    switch_share: float = Field(
        default=0.2, gt=0, lt=1, description="quantum = switch cost x (1-share)/share: switching "
        "takes at most this share of the time")
    idle_grace: float = Field(
        default=0.25, ge=0, description="seconds an idle model within its quantum keeps the "
        "resource after its last answer while a rival waits (a client sending back to back "
        "leaves a gap of its round trip)")
    observe_interval: float = Field(
        default=5.0, gt=0, description="seconds between reads of the fleet's state (sees `fleet "
        "switch` from the host)")
    sleep_check_interval: float = Field(
        default=1.0, ge=0, description="how long an /is_sleeping answer is trusted")


ENV_PREFIX = "GATEWAY_"


def env_name(field: str) -> str:
    """The environment variable of setting `field` (`read_timeout` -> GATEWAY_READ_TIMEOUT)."""
    return ENV_PREFIX + field.upper()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per `GATEWAY_*` variable that is no setting, with a "did you mean" when one
    is close (`GATEWAY_API_KEY` -> GATEWAY_API_KEYS): a misspelt variable is otherwise
    ignored without a word, and a misspelt key variable leaves the gateway open."""
    known = [f.upper() for f in GatewaySettings.model_fields]
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper[len(ENV_PREFIX):] in known:
            continue
        close = difflib.get_close_matches(upper[len(ENV_PREFIX):], known, n=1, cutoff=0.6)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        problems.append(f"unknown setting {name}{hint}; settings: `gateway --help`")
    return problems
