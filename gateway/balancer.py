"""Choosing a replica: least outstanding requests among those not taken out.

A replica that refuses connections or fails is taken out ("ejected") for a back-off period;
the health prober (or the back-off expiring) brings it back. Pure bookkeeping with an
injectable clock: no I/O here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(eq=False)
class Instance:
    """One replica of a model, as the gateway sees it."""

    model: str
    index: int
    base_url: str
    outstanding: int = 0
    ejected_until: float = 0.0
    failures: int = 0              # consecutive failures (back-off grows with them)
    draining: bool = False         # being retired (autoscaling): no new requests
    last_error: str = ""


class Balancer:
    """Least-outstanding choice with ejection and exponential back-off."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, base_backoff: float = 1.0,
                 max_backoff: float = 30.0) -> None:
        self.clock = clock
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff

    def available(self, instance: Instance) -> bool:
        return instance.ejected_until <= self.clock()

    def pick(self, instances: Sequence[Instance],
             exclude: Sequence[Instance] = ()) -> Instance | None:
        """The available replica with the fewest outstanding requests (ties: lowest index).

        When every replica not excluded is ejected, the one whose back-off ends first is
        returned, so a model with one flaky replica still gets tried rather than refused.
        """
        candidates = [i for i in instances if i not in exclude and not i.draining]
        if not candidates:
            return None
        ready = [i for i in candidates if self.available(i)]
        if ready:
            return min(ready, key=lambda i: (i.outstanding, i.index))
        return min(candidates, key=lambda i: (i.ejected_until, i.index))

    def eject(self, instance: Instance, reason: str) -> None:
        instance.failures += 1
        backoff = min(self.max_backoff, self.base_backoff * 2 ** (instance.failures - 1))
        instance.ejected_until = self.clock() + backoff
        instance.last_error = reason

    def restore(self, instance: Instance) -> None:
        instance.failures = 0
        instance.ejected_until = 0.0
        instance.last_error = ""
