"""Per-model admission: at most `max_concurrency` in flight, a bounded queue beyond it.

Also the in-flight bookkeeping every model has (limit or not): the fleet asks whether a model
is busy before evicting it, idle ttl and autoscaling read the same figures.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from gateway import errors


class Admission:
    """In-flight count, queue and last-use time of one model."""

    def __init__(self, model: str, max_concurrency: int | None, max_queue: int,
                 queue_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.clock = clock
        self.in_flight = 0
        self.last_used = clock()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._since: dict[asyncio.Future[None], float] = {}  # waiter -> when it queued

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def oldest_wait(self) -> float | None:
        """Seconds the longest-waiting queued request has waited (None: nobody waits)."""
        # FIFO: the first entry (insertion order) is the oldest.
        return self.clock() - next(iter(self._since.values())) if self._since else None

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed; GatewayError 429 when it is full or
        the wait exceeds `queue_timeout`."""
        self.last_used = self.clock()
        if self.max_concurrency is None or (self.in_flight < self.max_concurrency
                                            and not self._waiters):
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise errors.GatewayError(
                429, f"Model `{self.model}` is at its limit of {self.max_concurrency} concurrent "
                     f"requests and {self.max_queue} queued; retry later.",
                retry_after=max(1, round(self.queue_timeout / 4)))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._since[waiter] = self.clock()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot was handed over just as the wait ran out: keep it
            waiter.cancel()
            raise errors.GatewayError(
                429, f"Model `{self.model}` stayed at its limit of {self.max_concurrency} "
                     f"concurrent requests for {self.queue_timeout:g} s while this request "
                     f"waited; retry later.",
                retry_after=max(1, round(self.queue_timeout / 4))) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then the client went away
            else:
                waiter.cancel()
            raise
        finally:
            self._since.pop(waiter, None)
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        """Give the slot back: straight to the next waiter, or free it."""
        self.last_used = self.clock()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to it; in_flight is unchanged
                return
        self.in_flight -= 1
