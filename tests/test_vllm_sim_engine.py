"""vllm_sim.engine: admission, aborts and sleep modes, driven in-process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vllm_sim.engine import Engine, SimRequest

pytestmark = pytest.mark.unit


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


def _req(rid: str) -> SimRequest:
    return SimRequest(rid, "chat", "tiny", True, prompt_tokens=4, max_tokens=8, receive=_never)


def test_admission_queues_beyond_max_num_seqs() -> None:
    async def scenario() -> None:
        engine = Engine(max_num_seqs=1)
        a, b = _req("a"), _req("b")
        assert await engine.admit(a)
        waiting = asyncio.create_task(engine.admit(b))
        await asyncio.sleep(0)
        assert (engine.running, engine.waiting, b.state) == (1, 1, "waiting")
        a.completion_tokens = 8
        engine.finish(a, "length")
        assert await waiting
        assert (engine.running, engine.waiting, b.state) == (1, 0, "running")
        engine.finish(b, "length")
        assert engine.success["length"] == 2 and engine.generation_tokens_total == 8
        assert engine.prompt_tokens_total == 8

    asyncio.run(scenario())


def test_abort_wakes_a_waiting_request_at_once() -> None:
    async def scenario() -> None:
        engine = Engine(max_num_seqs=4)
        req = _req("a")
        assert await engine.admit(req)
        sleeper = asyncio.create_task(req.sleep(60))
        await asyncio.sleep(0)
        req.abort("client_disconnect")
        assert await asyncio.wait_for(sleeper, 1) is False
        engine.finish(req, "length")
        assert req.outcome == "aborted" and engine.running == 0
        assert sum(engine.success.values()) == 0  # a client abort is no success, as in vLLM

    asyncio.run(scenario())


def test_sleep_abort_mode_finishes_requests_in_flight() -> None:
    async def scenario() -> None:
        engine = Engine(max_num_seqs=4)
        req = _req("a")
        assert await engine.admit(req)
        sleeper = asyncio.create_task(req.sleep(60))
        await asyncio.sleep(0)
        await engine.sleep(1, "abort")
        assert await asyncio.wait_for(sleeper, 1) is False
        engine.finish(req, "length")
        assert req.finish_reason == "abort" and engine.success["abort"] == 1

    asyncio.run(scenario())


def test_requests_wait_while_asleep_and_run_after_full_wake_up() -> None:
    async def scenario() -> None:
        engine = Engine(max_num_seqs=4)
        await engine.sleep(1, "abort")
        req = _req("a")
        admitted = asyncio.create_task(engine.admit(req))
        await asyncio.sleep(0.01)
        assert engine.waiting == 1 and not admitted.done()
        engine.wake_up(["weights"])
        await asyncio.sleep(0.01)
        assert engine.is_sleeping and not admitted.done()
        engine.wake_up(["kv_cache"])
        assert await asyncio.wait_for(admitted, 1)
        assert not engine.is_sleeping and engine.running == 1

    asyncio.run(scenario())


def test_sleep_keep_mode_freezes_and_wait_mode_drains() -> None:
    async def scenario() -> None:
        engine = Engine(max_num_seqs=4)
        req = _req("a")
        assert await engine.admit(req)
        await engine.sleep(1, "keep")
        held = asyncio.create_task(engine.hold_point(req))
        await asyncio.sleep(0.01)
        assert not held.done()
        engine.wake_up(None)
        assert await asyncio.wait_for(held, 1)
        draining = asyncio.create_task(engine.sleep(1, "wait"))
        await asyncio.sleep(0.03)
        assert not draining.done()
        engine.finish(req, "length")
        await asyncio.wait_for(draining, 1)
        assert req.outcome == "completed" and engine.is_sleeping

    asyncio.run(scenario())
