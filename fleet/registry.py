"""The model registry: `models.toml` parsed into a pure, typed, validated model.

This module is the one source of truth shared by the gateway and the fleet. It does no I/O
beyond reading the registry file, and everything else (routing table, container specs,
placement plans, compose.yaml) is derived from the objects defined here.

Errors never pass silently: unknown keys (typos), clashing ports or aliases and out-of-range
fractions raise `RegistryError`, whose message names the file, the model and the field, and
says how to fix it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.cluster import Cluster, Node, cluster_problems

DEFAULT_REGISTRY_PATH = "models.toml"
REGISTRY_ENV = "FLEET_REGISTRY"
DEFAULT_IMAGE = "vllm/vllm-openai:v0.32.0"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Flags that the registry owns: passing them in `args` would silently fight the typed fields.
_OWNED_FLAGS = {
    "--model": "source",
    "--served-model-name": "aliases",
    "--port": "port",
    "--host": "(the fleet sets it)",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--max-model-len": "max_model_len",
    "--tensor-parallel-size": "gpus (its length is the tensor-parallel size)",
    "--enable-sleep-mode": "sleep_mode",
}


class RegistryError(ValueError):
    """The registry file is missing, unreadable or invalid; `problems` lists every finding."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid registry ({len(problems)} problem(s)):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpu(_Strict):
    """One GPU of the host inventory."""

    id: int = Field(ge=0)
    memory_gib: float | None = Field(default=None, gt=0)


class Host(_Strict):
    """The declared host inventory the placement planner budgets against."""

    gpus: tuple[Gpu, ...] = ()
    cpus: int | None = Field(default=None, ge=1, description="CPU cores available to the fleet")
    gateway_cpus: int = Field(default=1, ge=0, description="cores kept for the gateway")
    gpu_memory_ceiling: float = Field(
        default=0.95, gt=0, le=1, description="max sum of memory fractions of awake models per GPU"
    )


class Defaults(_Strict):
    """Values every managed model inherits unless it sets its own."""

    image: str = DEFAULT_IMAGE
    host_ip: str = "127.0.0.1"
    models_dir: str | None = None
    hf_cache: str | None = "~/.cache/huggingface"
    shm_size: str | None = None
    ipc_host: bool = True
    health_timeout: float = Field(default=900.0, gt=0)
    cpus: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)


class ModelSpec(_Strict):
    """One `[models.NAME]` table. Exactly one of `source` (managed) or `url` (remote)."""

    name: str
    description: str = ""
    tags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    # A remote model: an already running OpenAI-compatible server (or a list of replicas of
    # one), routed to, never managed.
    url: str | tuple[str, ...] | None = None
    served_model_name: str | None = None
    # A managed model: one vLLM container.
    source: str | None = None
    image: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    host_ip: str | None = None
    gpus: tuple[int, ...] = ()
    dedicated: bool = False
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    cpus: int | None = Field(default=None, ge=1)
    sleep_mode: bool = False
    autostart: bool = True
    health_timeout: float | None = Field(default=None, gt=0)
    shm_size: str | None = None
    ipc_host: bool | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    # Replicas: `replicas` containers (ports port, port+1, ...), or autoscaled between
    # min_replicas and max_replicas around target_ongoing_requests per replica.
    replicas: int = Field(default=1, ge=1, le=64)
    min_replicas: int | None = Field(default=None, ge=0, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=64)
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    upscale_delay: float = Field(default=30.0, ge=0, description="seconds of load before +1")
    downscale_delay: float = Field(default=600.0, ge=0, description="idle seconds before -1")
    # Serving limits and timeouts (the gateway's), and idle time-to-live (the fleet's).
    max_concurrency: int | None = Field(default=None, ge=1, description="in flight per model")
    max_queue: int = Field(default=64, ge=0, description="waiting beyond max_concurrency")
    queue_timeout: float = Field(default=30.0, gt=0, description="seconds a request may wait")
    connect_timeout: float | None = Field(default=None, gt=0)
    read_timeout: float | None = Field(default=None, gt=0)
    ttl: float | None = Field(default=None, gt=0, description="idle seconds before sleep/stop")
    # On a Swarm ([cluster] engine = "swarm"): the node it runs on, or labels its node needs.
    node: str | None = None
    node_labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("tags", "aliases", "args", "volumes", "gpus")
    @classmethod
    def _no_duplicates(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        seen = [v for i, v in enumerate(value) if v in value[:i]]
        if seen:
            raise ValueError(f"lists {seen[0]!r} more than once; remove the repeat")
        return value

    @property
    def managed(self) -> bool:
        """True for a model whose container the fleet runs; False for a remote `url`."""
        return self.url is None

    @property
    def served_names(self) -> tuple[str, ...]:
        """Names the upstream server answers to (vLLM's `--served-model-name`)."""
        if self.served_model_name is not None:
            return (self.served_model_name,)
        return (self.name, *self.aliases)

    @property
    def upstream_model(self) -> str:
        """The `model` value the upstream server expects in a request body."""
        return self.served_names[0]

    @property
    def tensor_parallel_size(self) -> int:
        return max(1, len(self.gpus))

    @property
    def urls(self) -> tuple[str, ...]:
        """A remote model's replica URLs (empty for a managed model)."""
        if self.url is None:
            return ()
        return (self.url,) if isinstance(self.url, str) else self.url

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None

    @property
    def replica_slots(self) -> int:
        """How many replicas the model may ever have (ports and planner budget)."""
        return self.max_replicas if self.max_replicas is not None else self.replicas

    @property
    def initial_replicas(self) -> int:
        """Replicas started by `fleet up`."""
        if self.autoscaled:
            return max(1, self.min_replicas if self.min_replicas is not None else 1)
        return self.replicas

    def replica_port(self, index: int) -> int:
        assert self.port is not None
        return self.port + index


class Registry(_Strict):
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


# ---------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------


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
        raise RegistryError(
            source,
            [f"file not found; create it (see README 'Registry reference') or pass "
             f"--registry PATH / set {REGISTRY_ENV}"],
        ) from None
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
    if model_id != name and _ALIAS_RE.match(model_id):
        spec["aliases"] = [model_id]
    if url:
        spec.update(url=url, served_model_name=model_id)
    else:
        try:
            spec.update(source=model_id, port=int(port) if port is not None else 8001)
        except ValueError:
            raise RegistryError("$MODEL_ID", [f"MODEL_PORT: {port!r} is not a port number"]) from None
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
# First path segments the gateway owns: a model with such a name could not have its
# /{model}/... routes.
RESERVED_NAMES = frozenset({"admin", "v1", "v2", "health", "metrics"})


def build_registry(data: Mapping[str, Any], source: str = DEFAULT_REGISTRY_PATH) -> Registry:
    """Validate already-parsed registry data."""
    problems: list[str] = []
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(f"top level: unknown table {key!r}{_suggest(key, _TOP_KEYS)}; "
                            f"allowed: {', '.join(_TOP_KEYS)}")

    host = _section(Host, data.get("host", {}), "[host]", problems)
    defaults = _section(Defaults, data.get("defaults", {}), "[defaults]", problems)

    cluster = _section(Cluster, data["cluster"], "[cluster]", problems) \
        if "cluster" in data else None
    nodes: dict[str, Node] = {}
    raw_nodes = data.get("nodes", {})
    if not isinstance(raw_nodes, Mapping):
        problems.append("[nodes]: must be a table of [nodes.NAME] tables")
        raw_nodes = {}
    for node_name, raw_node in raw_nodes.items():
        node = _section(Node, raw_node, f"[nodes.{node_name}]", problems)
        if node is not None:
            nodes[node_name] = node

    raw_models = data.get("models", {})
    models: dict[str, ModelSpec] = {}
    if not isinstance(raw_models, Mapping):
        problems.append("[models]: must be a table of [models.NAME] tables")
        raw_models = {}
    if not raw_models:
        problems.append("[models]: no models defined; add at least one [models.NAME] table")
    for name, raw in raw_models.items():
        where = f"model {name!r}"
        if not _NAME_RE.match(name):
            problems.append(f"{where}: invalid name; use 1-63 lowercase letters, digits, '.', "
                            f"'_' or '-', starting with a letter or digit (put other spellings "
                            f"in `aliases`)")
            continue
        if name in RESERVED_NAMES:
            problems.append(f"{where}: the name is reserved for the gateway's own routes "
                            f"({', '.join(sorted(RESERVED_NAMES))}); pick another name and "
                            f"put {name!r} in `aliases` if clients must use it")
            continue
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a table ([models.{name}])")
            continue
        if "name" in raw:
            problems.append(f"{where}: field 'name': the name is the table key; remove it")
            continue
        spec = _section(ModelSpec, {**raw, "name": name}, where, problems)
        if spec is not None:
            models[name] = spec

    if host is not None and defaults is not None:
        problems.extend(_cross_checks(models, host, defaults))
    if "cluster" not in data or cluster is not None:
        problems.extend(cluster_problems(cluster, nodes, models))
    if problems:
        raise RegistryError(source, problems)
    assert host is not None and defaults is not None
    return Registry(source=source, host=host, defaults=defaults, models=models,
                    cluster=cluster, nodes=nodes)


def _section(cls: type[BaseModel], raw: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a table")
        return None
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as exc:
        fields = list(cls.model_fields)
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                key = str(err["loc"][0])
                problems.append(f"{where}: unknown field {key!r}{_suggest(key, fields)}; "
                                f"remove it or fix the spelling")
            else:
                value = err.get("input")
                problems.append(f"{where}: field {loc!r}: {_describe(err)} (got {value!r})")
        return None


def _describe(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _replica_checks(where: str, m: ModelSpec) -> list[str]:
    problems = []
    scaling = (m.min_replicas, m.max_replicas, m.target_ongoing_requests)
    if any(v is not None for v in scaling):
        if m.max_replicas is None or m.target_ongoing_requests is None:
            problems.append(f"{where}: autoscaling needs both 'max_replicas' and "
                            f"'target_ongoing_requests' (min_replicas defaults to 1)")
        elif m.replicas != 1:
            problems.append(f"{where}: field 'replicas': set either 'replicas' (fixed) or "
                            f"'min_replicas'/'max_replicas' (autoscaled), not both")
        elif (m.min_replicas or 0) > m.max_replicas:
            problems.append(f"{where}: field 'min_replicas': {m.min_replicas} is above "
                            f"max_replicas {m.max_replicas}")
    return problems


def _cross_checks(models: Mapping[str, ModelSpec], host: Host, defaults: Defaults) -> list[str]:
    problems: list[str] = []
    ports: dict[tuple[str, int], str] = {}
    owners: dict[str, str] = {name: name for name in models}
    gpu_ids = {g.id for g in host.gpus}
    for name, m in models.items():
        where = f"model {name!r}"
        if (m.url is None) == (m.source is None):
            problems.append(f"{where}: set exactly one of 'source' (a model the fleet runs: an "
                            f"HF repo id or a path under models_dir) or 'url' (an already "
                            f"running server to route to)")
        if m.url is not None:
            if not m.urls:
                problems.append(f"{where}: field 'url': the list is empty; give at least one URL")
            for u in m.urls:
                if not re.match(r"^https?://[^/\s]+", u):
                    problems.append(f"{where}: field 'url': must start with http:// or https:// "
                                    f"(got {u!r})")
            if len(set(m.urls)) != len(m.urls):
                problems.append(f"{where}: field 'url': lists a URL more than once")
            managed_only = [f for f in ("port", "image", "max_model_len", "cpus", "shm_size",
                                        "health_timeout", "gpu_memory_utilization", "ipc_host",
                                        "host_ip")
                            if getattr(m, f) is not None]
            managed_only += [f for f in ("gpus", "args", "env", "volumes") if getattr(m, f)]
            managed_only += [f for f in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                         "ttl") if getattr(m, f) is not None]
            if m.replicas != 1:
                managed_only.append("replicas (list the replicas' URLs in 'url' instead)")
            managed_only += [f for f in ("dedicated", "sleep_mode") if getattr(m, f)]
            if managed_only:
                problems.append(f"{where}: field(s) {', '.join(managed_only)} only apply to "
                                f"managed models (with 'source'); a 'url' model is never "
                                f"started by the fleet: remove them")
        else:
            if m.served_model_name is not None:
                problems.append(f"{where}: field 'served_model_name' is only for 'url' models; "
                                f"a managed model is served under its name and aliases")
            if m.port is None:
                problems.append(f"{where}: field 'port' is required for a managed model; pick "
                                f"a free port, e.g. 8001")
            else:
                for i in range(m.replica_slots):
                    key = (m.host_ip or defaults.host_ip, m.replica_port(i))
                    what = "port" if i == 0 else f"replica {i}'s port (port + {i})"
                    if key[1] > 65535:
                        problems.append(f"{where}: field 'port': {what} {key[1]} is above 65535")
                    elif key in ports:
                        problems.append(f"{where}: field 'port': {what} {key[1]} is already used "
                                        f"by model {ports[key]!r}; give each model its own port "
                                        f"(replicas use port, port+1, ...)")
                    else:
                        ports[key] = name
            problems.extend(_replica_checks(where, m))
            for gpu in m.gpus:
                if gpu_ids and gpu not in gpu_ids:
                    problems.append(f"{where}: field 'gpus': GPU {gpu} is not in [host].gpus "
                                    f"(declared: {sorted(gpu_ids)}); fix the id or declare it")
            if m.dedicated and not m.gpus:
                problems.append(f"{where}: field 'dedicated' needs 'gpus' (the GPUs it owns)")
            for arg in (*defaults.args, *m.args):
                flag = arg.split("=", 1)[0]
                if flag in _OWNED_FLAGS:
                    problems.append(f"{where}: field 'args': {flag} is set from the registry "
                                    f"field {_OWNED_FLAGS[flag]}; use that field instead")
        for key in (*m.env, *defaults.env):
            if not _ENV_RE.match(key):
                problems.append(f"{where}: field 'env': {key!r} is not a valid variable name")
        for alias in m.aliases:
            if not _ALIAS_RE.match(alias):
                problems.append(f"{where}: field 'aliases': {alias!r} is not a valid model "
                                f"name (letters, digits and . _ : / @ + - only)")
            elif alias in owners and owners[alias] != name:
                other = owners[alias]
                what = "the name of" if alias in models else "an alias of"
                problems.append(f"{where}: field 'aliases': {alias!r} is already {what} model "
                                f"{other!r}; every name and alias must be unique")
            else:
                owners[alias] = name
    return problems
