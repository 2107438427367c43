"""The registry's host-level tables: `[host]` (the inventory the placement planner budgets
against) and `[defaults]` (what every managed model inherits), and `Strict`, the base of
every registry table. Pure pydantic models; `fleet.registry` builds the whole registry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fleet.states import PullPolicy

DEFAULT_IMAGE = "vllm/vllm-openai:v0.32.0"


class Strict(BaseModel):
    """A registry table: unknown keys are errors, values are frozen."""


    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpu(Strict):
    """One GPU of the host inventory."""

    id: int = Field(ge=0)
    memory_gib: float | None = Field(default=None, gt=0)


class Host(Strict):
    """The declared host inventory the placement planner budgets against."""

    gpus: tuple[Gpu, ...] = ()
    cpus: int | None = Field(default=None, ge=1, description="CPU cores available to the fleet")
    gateway_cpus: int = Field(default=1, ge=0, description="cores kept for the gateway")
    gpu_memory_ceiling: float = Field(
        default=0.95, gt=0, le=1, description="max sum of memory fractions of awake models per GPU"
    )


class Defaults(Strict):
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
    pull: PullPolicy = PullPolicy.MISSING  # when to pull the image (fleet.pull)
