"""The registry's validation rules beyond single fields: names, every field of a section at
once (unknown keys with a "did you mean"), and the rules across fields and models (ports,
aliases, flags the registry owns, replicas, managed vs remote). Pure; used by
`fleet.registry.build_registry`, every problem reported in words that name the model and the
field and say how to fix it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from fleet.inventory import Defaults, Host
    from fleet.model_spec import ModelSpec

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Flags that the registry owns: passing them in `args` would silently fight the typed fields.
OWNED_FLAGS = {
    "--model": "source",
    "--served-model-name": "aliases",
    "--port": "port",
    "--host": "(the fleet sets it)",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--max-model-len": "max_model_len",
    "--tensor-parallel-size": "gpus (its length is the tensor-parallel size)",
    "--enable-sleep-mode": "sleep_mode",
}
# First path segments the gateway owns: a model with such a name could not have its
# /{model}/... routes.
RESERVED_NAMES = frozenset({"admin", "v1", "v2", "health", "metrics"})


def name_problem(name: str) -> str | None:
    """What is wrong with `name` as a model's name (the table key), or None."""
    if not NAME_RE.match(name):
        return ("invalid name; use 1-63 lowercase letters, digits, '.', '_' or '-', starting "
                "with a letter or digit (put other spellings in `aliases`)")
    if name in RESERVED_NAMES:
        return (f"the name is reserved for the gateway's own routes "
                f"({', '.join(sorted(RESERVED_NAMES))}); pick another name and put {name!r} "
                f"in `aliases` if clients must use it")
    return None


def validate_section(cls: type[BaseModel], raw: Any, where: str, problems: list[str]) -> Any:
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
                problems.append(f"{where}: unknown field {key!r}{suggest(key, fields)}; "
                                f"remove it or fix the spelling")
            else:
                value = err.get("input")
                problems.append(f"{where}: field {loc!r}: {describe(err)} (got {value!r})")
        return None


def describe(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def replica_checks(where: str, m: ModelSpec) -> list[str]:
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


def cross_checks(models: Mapping[str, ModelSpec], host: Host, defaults: Defaults) -> list[str]:
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
            managed_only = [f for f in ("port", "image", "pull", "max_model_len", "cpus",
                                        "shm_size", "health_timeout", "gpu_memory_utilization",
                                        "ipc_host", "host_ip")
                            if getattr(m, f) is not None]
            managed_only += [f for f in ("gpus", "args", "env", "volumes") if getattr(m, f)]
            managed_only += [f for f in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                         "ttl") if getattr(m, f) is not None]
            if m.replicas != 1:
                managed_only.append("replicas (list the replicas' URLs in 'url' instead)")
            managed_only += [f for f in ("dedicated", "sleep_mode", "pinned") if getattr(m, f)]
            managed_only += [f for f in ("quantum",) if getattr(m, f) is not None]
            managed_only += ["priority"] if m.priority != 1.0 else []
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
            problems.extend(replica_checks(where, m))
            for gpu in m.gpus:
                if gpu_ids and gpu not in gpu_ids:
                    problems.append(f"{where}: field 'gpus': GPU {gpu} is not in [host].gpus "
                                    f"(declared: {sorted(gpu_ids)}); fix the id or declare it")
            if m.dedicated and not m.gpus:
                problems.append(f"{where}: field 'dedicated' needs 'gpus' (the GPUs it owns)")
            for arg in (*defaults.args, *m.args):
                flag = arg.split("=", 1)[0]
                if flag in OWNED_FLAGS:
                    problems.append(f"{where}: field 'args': {flag} is set from the registry "
                                    f"field {OWNED_FLAGS[flag]}; use that field instead")
        for var in (*m.env, *defaults.env):
            if not ENV_RE.match(var):
                problems.append(f"{where}: field 'env': {var!r} is not a valid variable name")
        for alias in m.aliases:
            if not ALIAS_RE.match(alias):
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
