"""The model registry: `models.toml` parsed into a pure, typed, validated model.

This module is the one source of truth shared by the gateway and the fleet. It does no I/O
beyond reading the registry file, and everything else (routing table, container specs,
placement plans, compose.yaml) is derived from the objects defined here.

Errors never pass silently: unknown keys (typos), clashing ports or aliases and out-of-range
fractions raise `RegistryError`, whose message names the file, the model and the field, and
says how to fix it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from fleet.cluster import Cluster, Node, cluster_problems, cluster_tables
from fleet.errors import RegistryError as RegistryError  # imported from here by the gateway
from fleet.inventory import DEFAULT_IMAGE as DEFAULT_IMAGE
from fleet.inventory import Defaults as Defaults
from fleet.inventory import Gpu as Gpu
from fleet.inventory import Host as Host
from fleet.inventory import Strict
from fleet.model_spec import ModelSpec as ModelSpec
from fleet.registry_checks import (
    ALIAS_RE,
    cross_checks,
    name_problem,
    suggest,
    validate_section,
)

DEFAULT_REGISTRY_PATH = "models.toml"
REGISTRY_ENV = "FLEET_REGISTRY"


class Registry(Strict):
    """The whole registry: host inventory, defaults and models, keyed by name."""

    source: str = DEFAULT_REGISTRY_PATH
    host: Host = Host()
    defaults: Defaults = Defaults()
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    cluster: Cluster | None = None  # None: one Docker host (engine "docker")
    nodes: dict[str, Node] = Field(default_factory=dict)  # Swarm nodes' inventories

    @property
    def swarm(self) -> bool:
        """True when the models run on a Docker Swarm (`[cluster] engine = "swarm"`)."""
        return self.cluster is not None and self.cluster.engine == "swarm"

    def get(self, name_or_alias: str) -> ModelSpec | None:
        """The model whose name or alias is `name_or_alias`, or None."""
        model = self.models.get(name_or_alias)
        if model is not None:
            return model
        return self.alias_table().get(name_or_alias)

    def alias_table(self) -> dict[str, ModelSpec]:
        """Every name and alias -> its model (names first)."""
        table: dict[str, ModelSpec] = {}
        for model in self.models.values():
            table[model.name] = model
        for model in self.models.values():
            for alias in model.aliases:
                table.setdefault(alias, model)
        return table

    def names(self) -> list[str]:
        return list(self.models)

    def with_host(self, **overrides: Any) -> Registry:
        """This registry with `[host]` fields overridden (e.g. from CLI flags), re-validated.

        Keys are `Host` fields (`cpus`, `gateway_cpus`, `gpu_memory_ceiling`, `gpus` as a
        list of ids or of {id, memory_gib} tables); RegistryError names a bad value."""
        host = self.host.model_dump()
        for key, value in overrides.items():
            if key == "gpus" and value is not None:
                value = [g if isinstance(g, Mapping) else {"id": g} for g in value]
            host[key] = value
        data = {"host": host, "defaults": self.defaults.model_dump(),
                "models": {n: m.model_dump(exclude={"name"}, exclude_defaults=True)
                           for n, m in self.models.items()}}
        if self.cluster is not None:
            data["cluster"] = self.cluster.model_dump()
        if self.nodes:
            data["nodes"] = {n: node.model_dump() for n, node in self.nodes.items()}
        return build_registry(data, source=f"{self.source} (with host overrides)")

    # Resolved values: a model's own setting, else the registry default.
    def image(self, model: ModelSpec) -> str:
        return model.image or self.defaults.image

    def host_ip(self, model: ModelSpec) -> str:
        return model.host_ip or self.defaults.host_ip

    def health_timeout(self, model: ModelSpec) -> float:
        return model.health_timeout or self.defaults.health_timeout

    def gpu_fraction(self, model: ModelSpec) -> float:
        return model.gpu_memory_utilization or self.defaults.gpu_memory_utilization

    def cpus(self, model: ModelSpec) -> int | None:
        return model.cpus or self.defaults.cpus

    def args(self, model: ModelSpec) -> tuple[str, ...]:
        return (*self.defaults.args, *model.args)

    def env(self, model: ModelSpec) -> dict[str, str]:
        return {**self.defaults.env, **model.env}

    def shm_size(self, model: ModelSpec) -> str | None:
        return model.shm_size or self.defaults.shm_size

    def ipc_host(self, model: ModelSpec) -> bool:
        return self.defaults.ipc_host if model.ipc_host is None else model.ipc_host


def service_name(model_name: str) -> str:
    """The compose service / network alias of a managed model (stable, shared by all views)."""
    return f"vllm-{model_name}"


def replica_service_name(model_name: str, index: int) -> str:
    """Replica 0 is the model's service; replica i > 0 is `vllm-<name>-r<i>`."""
    return service_name(model_name) if index == 0 else f"{service_name(model_name)}-r{index}"


def upstream_base_url(registry: Registry, model: ModelSpec, upstream_host: str = "127.0.0.1") -> str:
    """Where the gateway reaches `model` (its first replica).

    `upstream_host` is the host for managed models: `127.0.0.1` when the gateway runs on the
    host, or the special value `service` inside compose, where each model is reached by its
    service name.
    """
    return replica_urls(registry, model, upstream_host)[0]


def replica_urls(registry: Registry, model: ModelSpec, upstream_host: str = "127.0.0.1") -> list[str]:
    """Every replica's base URL, in replica order (all `replica_slots` of a managed model)."""
    if model.url is not None:
        return [u.rstrip("/") for u in model.urls]
    out = []
    for i in range(model.replica_slots):
        host = replica_service_name(model.name, i) if upstream_host == "service" else upstream_host
        out.append(f"http://{host}:{model.replica_port(i)}")
    return out


def registry_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`explicit`, else `$FLEET_REGISTRY`, else `./models.toml`."""
    return Path(explicit or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY_PATH)


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Read and validate a registry file (TOML, or JSON when the name ends in .json)."""
    p = registry_path(path)
    source = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        how = f"pass --registry PATH / set {REGISTRY_ENV}"
        raise RegistryError(source, [f"file not found; create it (see README 'Registry "
                                     f"reference') or {how}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(source, [f"cannot read the file: {exc}"]) from None
    return parse_registry(text, source=source, fmt="json" if p.suffix == ".json" else "toml")


REGISTRY_JSON_ENV = "FLEET_REGISTRY_JSON"


def load_registry_from_env(path: str | os.PathLike[str] | None = None,
                           environ: Mapping[str, str] | None = None) -> Registry:
    """The registry by precedence: `path` (e.g. a --registry flag) > $FLEET_REGISTRY_JSON (the
    registry itself, as JSON) > $FLEET_REGISTRY (a file) > $MODEL_ID (a one-model registry:
    $MODEL_URL routes to an already running server, else the fleet runs it on $MODEL_PORT,
    default 8001) > ./models.toml."""
    env = os.environ if environ is None else environ
    if path:
        return load_registry(path)
    text = env.get(REGISTRY_JSON_ENV, "")
    if text.strip():
        return parse_registry(text, source=f"${REGISTRY_JSON_ENV}", fmt="json")
    if env.get(REGISTRY_ENV):
        return load_registry(env[REGISTRY_ENV])
    if env.get("MODEL_ID", "").strip():
        return single_model_registry(env["MODEL_ID"].strip(), url=env.get("MODEL_URL") or None,
                                     port=env.get("MODEL_PORT") or None)
    return load_registry(DEFAULT_REGISTRY_PATH)


def single_model_registry(model_id: str, *, url: str | None = None,
                          port: str | int | None = None) -> Registry:
    """One model named after the last part of `model_id` (lowercased), with `model_id` as an
    alias: routed to `url` (which serves `model_id`), else run by the fleet on `port`."""
    name = re.sub(r"[^a-z0-9._-]+", "-", model_id.rstrip("/").rsplit("/", 1)[-1].lower())
    name = name.lstrip("._-")[:63] or "model"
    spec: dict[str, Any] = {}
    if model_id != name and ALIAS_RE.match(model_id):
        spec["aliases"] = [model_id]
    if url:
        spec.update(url=url, served_model_name=model_id)
    else:
        try:
            spec.update(source=model_id, port=int(port) if port is not None else 8001)
        except ValueError:
            raise RegistryError("$MODEL_ID",
                                [f"MODEL_PORT: {port!r} is not a port number"]) from None
    return build_registry({"models": {name: spec}}, source="$MODEL_ID")


def parse_registry(text: str, source: str = DEFAULT_REGISTRY_PATH, fmt: str = "toml") -> Registry:
    """Parse registry text; raises RegistryError naming every problem found."""
    try:
        data = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(source, [f"not valid {fmt.upper()}: {exc}"]) from None
    if not isinstance(data, dict):
        raise RegistryError(source, ["the top level must be a table"])
    return build_registry(data, source=source)


_TOP_KEYS = ("host", "defaults", "models", "cluster", "nodes")


def build_registry(data: Mapping[str, Any], source: str = DEFAULT_REGISTRY_PATH) -> Registry:
    """Validate already-parsed registry data."""
    problems: list[str] = []
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(f"top level: unknown table {key!r}{suggest(key, _TOP_KEYS)}; "
                            f"allowed: {', '.join(_TOP_KEYS)}")

    host = validate_section(Host, data.get("host", {}), "[host]", problems)
    defaults = validate_section(Defaults, data.get("defaults", {}), "[defaults]", problems)

    cluster, nodes = cluster_tables(data, problems)

    raw_models = data.get("models", {})
    models: dict[str, ModelSpec] = {}
    if not isinstance(raw_models, Mapping):
        problems.append("[models]: must be a table of [models.NAME] tables")
        raw_models = {}
    if not raw_models:
        problems.append("[models]: no models defined; add at least one [models.NAME] table")
    for name, raw in raw_models.items():
        where = f"model {name!r}"
        bad_name = name_problem(name)
        if bad_name is not None:
            problems.append(f"{where}: {bad_name}")
            continue
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a table ([models.{name}])")
            continue
        if "name" in raw:
            problems.append(f"{where}: field 'name': the name is the table key; remove it")
            continue
        spec = validate_section(ModelSpec, {**raw, "name": name}, where, problems)
        if spec is not None:
            models[name] = spec

    if host is not None and defaults is not None:
        problems.extend(cross_checks(models, host, defaults))
    if "cluster" not in data or cluster is not None:
        problems.extend(cluster_problems(cluster, nodes, models))
    if problems:
        raise RegistryError(source, problems)
    assert host is not None and defaults is not None
    return Registry(source=source, host=host, defaults=defaults, models=models,
                    cluster=cluster, nodes=nodes)
