"""Capacity bars from the registry's host inventory and what is awake (pure).

With GPUs declared (`[host].gpus`): one bar per GPU, each awake replica holding its model's
memory fraction on each of its GPUs, against `gpu_memory_ceiling`. Without GPUs but with
`[host].cpus`: one bar of cores, the gateway's cores reserved, each awake replica holding its
model's `cpus`. Otherwise no bars (nothing is budgeted).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fleet.registry import Registry
from gateway.ui.snapshot import CapacityBar, Share

HOLDING = frozenset({"awake", "activating", "draining"})


def capacity_bars(registry: Registry, states: Mapping[str, str], awake: Mapping[str, int],
                  visible: Callable[[str], bool]) -> tuple[CapacityBar, ...]:
    """`states[model]` is the page's state, `awake[model]` how many replicas are up (at least
    one is assumed for a holding model); models not `visible` are shown as "other"."""
    holders = [(name, spec, max(awake.get(name, 0), 1))
               for name, spec in registry.models.items()
               if spec.managed and states.get(name) in HOLDING]
    host = registry.host
    if host.gpus:
        bars = []
        for gpu in host.gpus:
            shares = tuple(
                Share(name if visible(name) else "other",
                      round(registry.gpu_fraction(spec) * count, 4), states[name])
                for name, spec, count in holders if gpu.id in spec.gpus)
            label = f"GPU {gpu.id}" + (f" ({gpu.memory_gib:g} GiB)" if gpu.memory_gib else "")
            bars.append(CapacityBar(id=f"gpu{gpu.id}", label=label, unit="fraction",
                                    capacity=1.0, ceiling=host.gpu_memory_ceiling,
                                    shares=shares))
        return tuple(bars)
    if host.cpus:
        shares = tuple(
            Share(name if visible(name) else "other", float((registry.cpus(spec) or 0) * count),
                  states[name])
            for name, spec, count in holders if registry.cpus(spec))
        return (CapacityBar(id="cpu", label=f"CPU cores ({host.cpus})", unit="cores",
                            capacity=float(host.cpus), ceiling=float(host.cpus),
                            reserved=float(host.gateway_cpus), shares=shares),)
    return ()
