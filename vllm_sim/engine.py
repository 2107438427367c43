"""The simulated engine: admission, the sleep state, counters and the record of requests.

Scheduling: at most `max_num_seqs` requests run at once; the others wait in arrival order
(`vllm:num_requests_waiting`). While the engine sleeps nothing is admitted: new generation
requests wait until `/wake_up`, as in vLLM 0.32.0, whose `/sleep` pauses the scheduler
(new requests are queued, not refused). `/sleep?mode=` decides what happens to requests in
flight, like vLLM: `abort` (the default) finishes them at once with finish_reason "abort",
`wait` lets them finish before the engine sleeps, `keep` freezes them until `/wake_up`.

A client disconnect aborts a request at once. Like the real server (seen on 0.32.0), such a
request is not counted in `vllm:request_success_total`; its tokens so far still count in
`vllm:generation_tokens_total`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

FINISH_REASONS = ("stop", "length", "abort", "error")
SLEEP_TAGS = ("weights", "kv_cache")

Receive = Callable[[], Awaitable[dict[str, Any]]]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SimRequest:
    """One generation request: its accounting and the waits it can be woken from."""

    __slots__ = ("request_id", "endpoint", "model", "stream", "prompt_tokens", "max_tokens",
                 "completion_tokens", "state", "outcome", "finish_reason", "abort_reason",
                 "arrival", "finished_at", "aborted", "_receive", "_wake", "_watch", "_loop")

    def __init__(self, request_id: str, endpoint: str, model: str, stream: bool,
                 prompt_tokens: int, max_tokens: int, receive: Receive) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.completion_tokens = 0
        self.state = "new"  # new -> waiting -> running -> finished
        self.outcome: str | None = None  # completed | aborted
        self.finish_reason: str | None = None
        self.abort_reason: str | None = None  # client_disconnect | sleep | shutdown
        self.arrival = time.time()
        self.finished_at: float | None = None
        self.aborted = False
        self._receive = receive
        self._wake: asyncio.Future[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- waits that an abort interrupts -------------------------------------------------
    def _waiter(self) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._watch is None:
            # Watch for the client going away only once the request has to wait for something:
            # zero-delay requests never yield, so they need no watcher task.
            self._watch = loop.create_task(self._watch_disconnect())
        fut = loop.create_future()
        self._wake = fut
        return fut

    async def sleep(self, delay: float) -> bool:
        """Wait `delay` seconds; False if the request was aborted (at once, not at the end)."""
        if self.aborted:
            return False
        fut = self._waiter()
        handle = self._loop.call_later(delay, _resolve, fut)  # type: ignore[union-attr]
        try:
            await fut
        finally:
            handle.cancel()
            self._wake = None
        return not self.aborted

    async def wait_for(self, event: asyncio.Future[Any]) -> bool:
        """Wait until `event` is done; False if the request was aborted first."""
        if self.aborted:
            return False
        if event.done():
            return True
        fut = self._waiter()

        def _done(_: asyncio.Future[Any]) -> None:
            _resolve(fut)

        event.add_done_callback(_done)
        try:
            await fut
        finally:
            event.remove_done_callback(_done)
            self._wake = None
        return not self.aborted

    def abort(self, reason: str) -> None:
        if self.aborted or self.state == "finished":
            return
        self.aborted = True
        self.abort_reason = reason
        if self._wake is not None:
            _resolve(self._wake)

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if self.state != "finished":
                    self.abort("client_disconnect")
                return

    def stop_watching(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.request_id, "endpoint": self.endpoint, "model": self.model,
            "stream": self.stream, "state": self.state, "outcome": self.outcome,
            "finish_reason": self.finish_reason, "abort_reason": self.abort_reason,
            "prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens,
            "completion_tokens": self.completion_tokens, "arrival": self.arrival,
            "finished_at": self.finished_at,
        }


class Engine:
    """Admission control, sleep state and counters of one simulated vLLM engine."""

    def __init__(self, max_num_seqs: int, history: int = 256) -> None:
        self.max_num_seqs = max_num_seqs
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.started_at = time.time()
        self.sleep_level: int | None = None  # None when awake
        self.sleeping_tags: set[str] = set()
        self.holding = False  # sleep mode "keep": requests in flight are frozen
        self.active: dict[str, SimRequest] = {}
        self.recent: deque[SimRequest] = deque(maxlen=history)
        self._queue: deque[tuple[asyncio.Future[None], SimRequest]] = deque()
        self._awake: asyncio.Future[None] | None = None

    @property
    def is_sleeping(self) -> bool:
        return self.sleep_level is not None

    # -- request lifecycle ----------------------------------------------------------------
    async def admit(self, req: SimRequest) -> bool:
        """Wait for a slot; False if the request was aborted before it got one.

        Whatever the answer, the caller must call `finish(req, ...)` exactly once afterwards.
        """
        self.active[req.request_id] = req
        self.recent.append(req)
        if self.sleep_level is None and self.running < self.max_num_seqs and not self._queue:
            self.running += 1
            req.state = "running"
            self.prompt_tokens_total += req.prompt_tokens
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, req)
        self._queue.append(entry)
        self.waiting += 1
        req.state = "waiting"
        await req.wait_for(fut)
        if fut.done():  # granted by _dispatch, which counted it as running
            req.state = "running"
            self.prompt_tokens_total += req.prompt_tokens
            return not req.aborted
        self._queue.remove(entry)
        self.waiting -= 1
        return False

    def finish(self, req: SimRequest, finish_reason: str | None) -> None:
        """Record the end of a request: completed with `finish_reason`, or aborted."""
        if req.state == "finished":
            return
        if req.state == "running":
            self.running -= 1
        req.state = "finished"
        req.finished_at = time.time()
        req.stop_watching()
        self.active.pop(req.request_id, None)
        self.generation_tokens_total += req.completion_tokens
        if req.aborted:
            req.outcome = "aborted"
            if req.abort_reason != "client_disconnect":
                req.finish_reason = "abort"
                self.success["abort"] += 1
        else:
            req.outcome = "completed"
            req.finish_reason = finish_reason
            if finish_reason in self.success:
                self.success[finish_reason] += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._queue and self.sleep_level is None and self.running < self.max_num_seqs:
            fut, _ = self._queue.popleft()
            self.waiting -= 1
            self.running += 1
            fut.set_result(None)

    async def hold_point(self, req: SimRequest) -> bool:
        """Between two tokens: wait while a `keep`-mode sleep freezes requests in flight."""
        while self.holding and not req.aborted:
            assert self._awake is not None
            await req.wait_for(self._awake)
        return not req.aborted

    # -- sleep / wake ---------------------------------------------------------------------
    async def sleep(self, level: int, mode: str) -> None:
        """Put the engine to sleep (see the module docstring for `mode`)."""
        if self._awake is None or self._awake.done():
            self._awake = asyncio.get_running_loop().create_future()
        self.sleep_level = level
        self.sleeping_tags = set(SLEEP_TAGS)
        if mode == "abort":
            for req in list(self.active.values()):
                req.abort("sleep")
        elif mode == "keep":
            self.holding = True
        elif mode == "wait":
            while self.running:
                await asyncio.sleep(0.01)

    def wake_up(self, tags: list[str] | None) -> None:
        """Wake all parts (tags=None) or some; the engine runs again when all are awake."""
        if tags is None:
            self.sleeping_tags.clear()
        else:
            self.sleeping_tags.difference_update(tags)
        if self.sleeping_tags:
            return
        self.sleep_level = None
        self.holding = False
        if self._awake is not None:
            _resolve(self._awake)
        self._dispatch()

    def abort_all(self, reason: str) -> None:
        for req in list(self.active.values()):
            req.abort(reason)
