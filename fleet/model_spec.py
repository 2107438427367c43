"""One `[models.NAME]` table of the registry: a managed model (`source`: a vLLM container the
fleet runs) or a remote one (`url`: a running server the gateway routes to). Pure pydantic;
`fleet.registry` validates it with the rest of the registry (and re-exports it).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from fleet.inventory import Strict
from fleet.states import PullPolicy


class ModelSpec(Strict):
    """One `[models.NAME]` table. Exactly one of `source` (managed) or `url` (remote)."""

    name: str
    description: str = ""
    tags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    # A remote model: a running OpenAI-compatible server (or its replicas' URLs), not managed.
    url: str | tuple[str, ...] | None = None
    served_model_name: str | None = None
    # A managed model: one vLLM container.
    source: str | None = None
    image: str | None = None
    pull: PullPolicy | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    host_ip: str | None = None
    gpus: tuple[int, ...] = ()
    dedicated: bool = False
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    cpus: int | None = Field(default=None, ge=1)
    sleep_mode: bool = False
    autostart: bool = True
    pinned: bool = False  # never evicted by a switch (`fleet sleep`, `down` still act on it)
    # Time-sharing (the gateway's scheduler): the next model to get the resource is the one
    # whose oldest request has waited longest times its `priority`; `quantum` overrides how
    # long it may keep the resource while others wait (default: from measured switch costs).
    priority: float = Field(default=1.0, gt=0)
    quantum: float | None = Field(default=None, gt=0)
    health_timeout: float | None = Field(default=None, gt=0)
    shm_size: str | None = None
    ipc_host: bool | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    # Replicas: `replicas` containers (ports port, port+1, ...), or autoscaled (min..max).
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
