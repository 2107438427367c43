"""`gateway` / `python -m gateway`: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from collections.abc import Callable

from fleet.registry import Registry, RegistryError, load_registry
from gateway.activation import FleetPort
from gateway.app import FleetFactory, create_app
from gateway.settings import GatewaySettings
from gateway.upstream import aiohttp_available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway in "
                                     "front of the vllm-fleet models (settings: GATEWAY_* env).")
    parser.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    parser.add_argument("--registry", help="registry file (FLEET_REGISTRY, default ./models.toml)")
    parser.add_argument("--upstream-host", help="host of managed models; 'service' in compose")
    parser.add_argument("--log-level", help="uvicorn log level (default info)")
    parser.add_argument("--upstream-client", choices=("aiohttp", "httpx"),
                        help="client to the models (GATEWAY_UPSTREAM_CLIENT; default aiohttp "
                             "when installed, else httpx)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = GatewaySettings(**overrides)
    except ValueError as exc:
        print(f"gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    if "upstream_client" not in settings.model_fields_set and aiohttp_available():
        settings = settings.model_copy(update={"upstream_client": "aiohttp"})
    try:
        registry = load_registry(settings.registry)
    except RegistryError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(registry, settings, fleet_factory=_fleet_factory(registry, settings))
    print(f"gateway: serving {len(registry.models)} model(s) from {registry.source} on "
          f"http://{settings.host}:{settings.port} (upstream client {settings.upstream_client})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log, loop="auto", http="auto",
                timeout_graceful_shutdown=30)
    return 0


def _fleet_factory(registry: Registry, settings: GatewaySettings) -> FleetFactory | None:
    """On-demand activation through the fleet's Python API, for registries with managed models."""
    if not settings.activation or not any(m.managed for m in registry.models.values()):
        return None

    def factory(busy: Callable[[str], bool], last_used: Callable[[str], float]) -> FleetPort:
        from fleet.api import open_fleet  # Docker is reached lazily, on the first activation

        return open_fleet(registry, busy=busy, last_used=last_used)

    return factory


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
