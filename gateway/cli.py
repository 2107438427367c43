"""`gateway` / `python -m gateway`: serve the gateway with uvicorn.

Every setting of `GatewaySettings` is a flag too (`read_timeout` -> `--read-timeout`), shown
by `--help` with its environment variable and default; a flag wins over the environment. An
unknown `GATEWAY_*` variable, or a bad value, stops the start with exit 2 naming it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import SecretStr, ValidationError

from fleet.registry import Registry, RegistryError, load_registry_from_env
from fleet.version import version
from gateway.activation import FleetPort
from gateway.app import create_app
from gateway.auth import AccessConfigError
from gateway.logs import configure_logging
from gateway.routing import addressing_problem
from gateway.server import serve
from gateway.server_direct import DirectHttpTools
from gateway.settings import GatewaySettings, env_name, unknown_variables

EXAMPLE = """\
example:
  gateway --registry models.toml --port 8000
  GATEWAY_API_KEYS=sk-one,sk-two gateway --host 0.0.0.0
  curl localhost:8000/v1/models
"""


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE,
        description="The OpenAI-compatible gateway in front of the vllm-fleet models.\n"
                    "Every setting is a flag or a GATEWAY_* environment variable (the flag "
                    "wins);\nan unknown GATEWAY_* variable is an error.")
    parser.add_argument("--version", action="version",
                        version=f"gateway (vllm-fleet) {version()}")
    for name, field in GatewaySettings.model_fields.items():
        default = field.default
        shown = "unset" if default is None or isinstance(default, SecretStr) else (
            default if default != "" else "empty")
        env = env_name(name)
        if name == "registry":
            env = "GATEWAY_REGISTRY, FLEET_REGISTRY"
            shown = "FLEET_REGISTRY_JSON, MODEL_ID, else ./models.toml"
        help_text = f"{field.description or name} (env {env}; default {shown})"
        if isinstance(default, SecretStr) or name in ("api_keys", "admin_key"):
            help_text += "; prefer the variable: flags show in `ps`"
        if field.annotation is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag(name), dest=name, default=None, metavar=_metavar(field),
                                help=help_text)
    return parser


def _metavar(field: Any) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if annotation is int:
        return "N"
    if annotation is float:
        return "SECONDS"
    return "VALUE"


def load_settings(argv: list[str] | None, environ: Mapping[str, str]
                  ) -> tuple[GatewaySettings | None, list[str], dict[str, Any]]:
    """(settings from flags over the environment, problems, the flags given); settings is
    None when a variable or flag is unknown or has a bad value (each problem names it)."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    problems = unknown_variables(environ)
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            field = "registry" if field.upper() in ("GATEWAY_REGISTRY", "FLEET_REGISTRY") \
                else field
            value = error.get("input")
            where = (f"{flag(field)} {value}" if field in overrides
                     else f"{env_name(field)}={value}")
            problems.append(f"invalid setting {where}: {error['msg']}")
        return None, problems, overrides
    return (None if problems else settings), problems, overrides


def main(argv: list[str] | None = None) -> int:
    settings, problems, flags = load_settings(argv, os.environ)
    if settings is None:
        for problem in problems:
            print(f"gateway: {problem}", file=sys.stderr)
        return 2
    if "upstream_client" not in settings.model_fields_set:
        settings = settings.model_copy(update={"upstream_client": "h1"})
    # --registry / GATEWAY_REGISTRY > FLEET_REGISTRY_JSON > FLEET_REGISTRY > MODEL_ID
    # > ./models.toml
    read = functools.partial(load_registry_from_env,
                             flags.get("registry") or os.environ.get("GATEWAY_REGISTRY") or None)

    def load() -> Registry:  # at start and on every reload
        registry = read()
        problem = addressing_problem(registry, settings.upstream_host)
        if problem is not None:
            raise RegistryError(registry.source, [problem])
        return registry

    try:
        registry = load()
    except RegistryError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(registry, settings, fleet_opener=_fleet_opener(registry, settings),
                         registry_loader=load, reload_on_sighup=True)
    except AccessConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    print(banner(registry, settings, app.state.gateway.access), file=sys.stderr, flush=True)
    serve(app, settings, graceful_shutdown=30, protocol=DirectHttpTools)
    return 0


def banner(registry: Registry, settings: GatewaySettings, access: Any) -> str:
    """One line: where it listens, how many models from where, whether keys are on."""
    keys = (f"API keys on ({len(access.api)})" if not access.open
            else "API keys off (open to anyone who can connect)")
    admin = "admin key on" if len(access.admin) else "admin endpoints off"
    return (f"gateway {version()}: listening on http://{settings.host}:{settings.port}; "
            f"{len(registry.models)} model(s) from {registry.source}; {keys}; {admin}; "
            f"upstream client {settings.upstream_client}")


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
        # pull and loading progress of on-demand activations go to the gateway's log
        return open_fleet(self.registry, settings, busy=busy, last_used=last_used,
                          progress=logging.getLogger("gateway.fleet").info)

    def for_registry(self, registry: Registry) -> RegistryFleetOpener:
        return RegistryFleetOpener(registry, self.upstream_host)



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
