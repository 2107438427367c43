"""Gateway settings: `GATEWAY_*` environment variables, overridden by CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Everything the gateway can be told; passed to `create_app`, never read globally."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    registry: str | None = Field(
        default=None,
        validation_alias=AliasChoices("GATEWAY_REGISTRY", "FLEET_REGISTRY", "registry"),
        description="registry path; default ./models.toml",
    )
    upstream_host: str = Field(
        default="127.0.0.1",
        description="host of managed models; 'service' inside compose (vllm-<name>)",
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=600.0, gt=0, description="max wait between bytes")
    write_timeout: float = Field(default=60.0, gt=0)
    pool_timeout: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=512, ge=1, description="per instance")
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
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    health_timeout: float = Field(default=2.0, gt=0, description="probe timeout for listings")
    retry_after: int = Field(default=5, ge=1, description="Retry-After seconds on 503")
    log_level: str = "info"
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
    observe_interval: float = Field(
        default=5.0, gt=0, description="seconds between reads of the fleet's state (sees `fleet "
        "switch` from the host)")
    sleep_check_interval: float = Field(
        default=1.0, ge=0, description="how long an /is_sleeping answer is trusted")
