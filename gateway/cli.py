"""`gateway` / `python -m gateway`: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from fleet.registry import Registry, RegistryError, load_registry_from_env
from gateway.activation import FleetPort
from gateway.app import create_app
from gateway.auth import AccessConfigError
from gateway.logs import configure_logging
from gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway in "
                                     "front of the vllm-fleet models (settings: GATEWAY_* env).")
    parser.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    parser.add_argument("--registry", help="registry file (also GATEWAY_REGISTRY); else "
                        "FLEET_REGISTRY_JSON, FLEET_REGISTRY, MODEL_ID, ./models.toml")
    parser.add_argument("--upstream-host", help="host of managed models; 'service' in compose")
    parser.add_argument("--log-level", help="uvicorn log level (default info)")
    parser.add_argument("--upstream-client", choices=("h1", "aiohttp", "httpx"),
                        help="client to the models (GATEWAY_UPSTREAM_CLIENT; default h1, the "
                             "gateway's own; https models use aiohttp)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = GatewaySettings(**overrides)
    except ValueError as exc:
        print(f"gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    if "upstream_client" not in settings.model_fields_set:
        settings = settings.model_copy(update={"upstream_client": "h1"})
    # --registry / GATEWAY_REGISTRY > FLEET_REGISTRY_JSON > FLEET_REGISTRY > MODEL_ID
    # > ./models.toml
    load = functools.partial(load_registry_from_env,
                             args.registry or os.environ.get("GATEWAY_REGISTRY") or None)
    try:
        registry = load()
    except RegistryError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(registry, settings, fleet_opener=_fleet_opener(registry, settings),
                         registry_loader=load, reload_on_sighup=True)
    except AccessConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    print(f"gateway: serving {len(registry.models)} model(s) from {registry.source} on "
          f"http://{settings.host}:{settings.port} (upstream client {settings.upstream_client})",
          file=sys.stderr, flush=True)
    # GATEWAY_ACCESS_LOG: the gateway writes its own lines (with the request id and model).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, loop="auto", http="auto",
                timeout_graceful_shutdown=30)
    return 0


def _fleet_opener(registry: Registry, settings: GatewaySettings) -> RegistryFleetOpener | None:
    """On-demand activation through the fleet's Python API (the app only opens the client
    once the registry has a managed model; a reload reopens it for the new registry)."""
    return RegistryFleetOpener(registry, settings.upstream_host) if settings.activation else None


class RegistryFleetOpener:
    """Opens the fleet client for one registry; `for_registry` gives the next one's opener.

    The fleet reaches the models where the gateway does (`upstream_host`, e.g. `service`
    inside compose) unless FLEET_UPSTREAM_HOST says otherwise: its health waits must reach
    the same servers the gateway's traffic goes to."""

    def __init__(self, registry: Registry, upstream_host: str | None = None) -> None:
        self.registry = registry
        self.upstream_host = upstream_host

    def __call__(self, busy: Callable[[str], bool], last_used: Callable[[str], float]) -> FleetPort:
        # Docker is reached lazily, on the first activation
        from fleet.api import load_settings, open_fleet

        settings = load_settings()
        if settings.upstream_host is None and self.upstream_host is not None:
            settings = settings.model_copy(update={"upstream_host": self.upstream_host})
        return open_fleet(self.registry, settings, busy=busy, last_used=last_used)

    def for_registry(self, registry: Registry) -> RegistryFleetOpener:
        return RegistryFleetOpener(registry, self.upstream_host)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
