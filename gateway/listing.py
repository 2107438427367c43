"""The gateway's own read-only routes: `GET /health`, `GET /metrics`, `GET /v1/models`,
`GET /v1/models/{id}`, and the replica health probe they and the probe loop use.

A model card is vLLM's (`id`, `object`, `created`, `owned_by`, `root`, `parent`,
`max_model_len`) plus the gateway's figures: aliases, description, tags, whether the fleet
manages it, replicas, `state` (`ready`: a replica's /health answers 200; `unhealthy`: one
answers, none 200; `unreachable`) and the in-flight and queued requests. A listing shows only
the models the caller's key may use; it works with the routing state it started with. With
`list_aliases` (the default) each alias follows its model as an entry of its own (the
model's card with `id` the alias and `alias_of` the model), so chat UIs offer it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from gateway import auth, errors
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.middleware import json_response
from gateway.routing import Route
from gateway.runtime import Runtime
from gateway.state import RoutingState


class Listing:
    """The read-only routes over one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def health(self, request: Request) -> Response:
        return json_response(request, {"status": "ok",
                                       "models": len(self.runtime.state.table.routes)})

    async def metrics(self, request: Request) -> Response:
        return Response(self.runtime.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    async def list_models(self, request: Request) -> Response:
        principal = getattr(request.state, "principal", None)
        state = self.runtime.state
        routes = [r for r in state.table.routes.values()
                  if principal is None or principal.may_use(r.model, state.aliases(r.model))]
        health = await asyncio.gather(*(self.probe(r) for r in routes))
        data = []
        aliases = self.runtime.settings.list_aliases
        for route, state_of in zip(routes, health, strict=True):
            card = self._card(state, route, state_of)
            data.append(card)
            if aliases:  # each alias an entry of its own: chat UIs' model pickers list ids
                data += [{**card, "id": alias, "alias_of": route.model}
                         for alias in card["aliases"]]
        return json_response(request, {"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        requested = request.path_params["model_id"]
        state = self.runtime.state
        route = state.table.resolve(requested)
        if route is None:
            principal = getattr(request.state, "principal", None)
            raise errors.unknown_model(requested, auth.visible_names(principal, state.registry))
        auth.authorize(getattr(request.state, "principal", None), route.model,
                       state.aliases(route.model))
        return json_response(request, self._card(state, route, await self.probe(route)))

    # -- replica health -------------------------------------------------------------------
    async def healthy(self, base_url: str) -> bool:
        """Whether the replica at `base_url` answers /health with 200."""
        return await self._health(base_url) == "ready"

    async def probe(self, route: Route) -> str:
        """`ready` (a replica's /health is 200), `unhealthy` (answers, not 200), `unreachable`.
        The replicas are asked at once: one `health_timeout` at most, however many."""
        results = await asyncio.gather(*(self._health(url) for url in route.replicas))
        if "ready" in results:
            return "ready"
        return "unhealthy" if "unhealthy" in results else "unreachable"

    async def _health(self, base_url: str) -> str:
        """One probe, within `health_timeout` whatever the upstream or the client does."""
        client = self.runtime.upstreams.client(base_url)
        limit = self.runtime.settings.health_timeout
        try:
            async with asyncio.timeout(limit):
                resp = await client.get("/health", timeout=limit)
        except (httpx.HTTPError, TimeoutError):
            return "unreachable"
        return "ready" if resp.status_code == 200 else "unhealthy"

    def _card(self, state: RoutingState, route: Route, health: str) -> dict[str, Any]:
        spec = state.registry.models[route.model]
        adm = state.admission[route.model]
        return {
            "id": route.model,
            "object": "model",
            "created": self.runtime.started,
            "owned_by": "vllm-fleet",
            "root": spec.source or spec.served_model_name or route.model,
            "parent": None,
            "max_model_len": spec.max_model_len,
            "aliases": list(spec.aliases),
            "description": spec.description,
            "tags": list(spec.tags),
            "managed": spec.managed,
            "replicas": len(route.replicas),
            "state": health,
            "in_flight": adm.in_flight,
            "queued": adm.waiting,
        }
