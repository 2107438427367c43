"""Hot reload of the registry (SIGHUP, `POST /admin/reload`) without dropping anything.

A reload reads the registry again (same precedence as at start: --registry/GATEWAY_REGISTRY >
FLEET_REGISTRY_JSON > FLEET_REGISTRY > MODEL_ID > ./models.toml), then has its target
(`ReloadTarget`, gateway/ports.py) swap in the routing state built from it and reopen the
fleet client for it. Requests that took their snapshot of the previous state keep it (a
stream in flight completes, even for a model that was removed); kept models keep their
replicas, counters and queue. An invalid registry changes nothing: the error is logged (and
returned to the admin caller) and the gateway keeps routing by the previous one. Reloads are
serialized.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from fleet.registry import Registry, RegistryError
from gateway.ports import ReloadTarget

log = logging.getLogger("gateway.reload")


@dataclass
class ReloadResult:
    """What a reload changed, by model name."""

    source: str
    models: list[str]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"status": "reloaded", **asdict(self)}


def diff(old: Registry, new: Registry) -> ReloadResult:
    return ReloadResult(
        source=new.source,
        models=list(new.models),
        added=[n for n in new.models if n not in old.models],
        removed=[n for n in old.models if n not in new.models],
        changed=[n for n, m in new.models.items() if n in old.models and old.models[n] != m],
    )


class Reloader:
    """Loads the registry with `load` and applies it to `target`."""

    def __init__(self, target: ReloadTarget, load: Callable[[], Registry]) -> None:
        self.target = target
        self.load = load
        self._lock: asyncio.Lock | None = None

    async def reload(self) -> ReloadResult:
        """Apply the registry as it is now; RegistryError (logged) leaves everything as is."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            gw = self.target
            try:
                registry = await anyio.to_thread.run_sync(self.load)
            except RegistryError as exc:
                gw.metrics.reloaded("invalid")
                log.error("registry reload rejected, keeping the previous registry: %s", exc,
                          extra={"fields": {"source": exc.source, "problems": len(exc.problems)}})
                raise
            result = diff(gw.state.registry, registry)
            gw.reconfigure(registry)
            gw.metrics.reloaded("ok")
            log.info("registry reloaded from %s", result.source, extra={"fields": {
                "models": len(result.models), "added": ",".join(result.added) or "-",
                "removed": ",".join(result.removed) or "-",
                "changed": ",".join(result.changed) or "-"}})
            return result

    async def reload_quietly(self) -> None:
        """For SIGHUP: reload, with failures only logged."""
        try:
            await self.reload()
        except RegistryError:
            pass  # logged by reload()
        except Exception:
            log.exception("registry reload failed; keeping the previous registry")
