"""`fleet check`: the planner's verdict on a registry, before anything runs.

Pure: every model alone must fit with its initial replicas and with all its replica slots
(else they can never all be used), all autostart models awake together must fit, and every
managed model must turn into a container spec.
"""

from __future__ import annotations

from fleet.placement import Violation, check_placement
from fleet.registry import Registry
from fleet.spec import DEFAULT_NAME_PREFIX, SpecError, container_spec
from fleet.states import ViolationKind


def check_registry(registry: Registry, *,
                   name_prefix: str = DEFAULT_NAME_PREFIX) -> list[Violation]:
    """What `fleet check` prints: every model alone must fit with its initial replicas and
    with all its replica slots (else they can never all be used), and all autostart models
    awake together (initial replicas) must fit; plus any model that cannot be turned into a
    container (kind spec)."""
    found: list[Violation] = []
    managed = [n for n, m in registry.models.items() if m.managed]
    for name in managed:
        model = registry.models[name]
        try:
            container_spec(registry, name, name_prefix=name_prefix)
        except SpecError as exc:
            found.append(Violation(ViolationKind.SPEC, str(exc)))
        alone = check_placement(registry, [name])
        for v in alone:
            found.append(Violation(v.kind, f"{name} alone: {v.message}"))
        if not alone and model.replica_slots > model.initial_replicas:
            for v in check_placement(registry, {name: model.replica_slots}):
                found.append(Violation(v.kind, f"{name} alone with all {model.replica_slots} "
                                       f"replicas (max_replicas): {v.message}"))
    autostart = [n for n in managed if registry.models[n].autostart]
    for v in check_placement(registry, autostart):
        found.append(Violation(v.kind, f"autostart models together ({', '.join(autostart)}): "
                               f"{v.message}"))
    return list(dict.fromkeys(found))
