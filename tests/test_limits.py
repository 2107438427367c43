"""Per-model admission: concurrency limit, bounded queue, hand-over and timeouts."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import GatewayError
from gateway.limits import Admission

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


async def test_unlimited_counts_in_flight() -> None:
    adm = Admission("m", None, 0, 1.0)
    await adm.acquire()
    await adm.acquire()
    assert adm.in_flight == 2
    adm.release()
    assert adm.in_flight == 1


async def test_queue_then_hand_over_in_order() -> None:
    adm = Admission("m", 1, 2, 5.0)
    await adm.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await adm.acquire()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in (1, 2)]
    while adm.waiting < 2:
        await asyncio.sleep(0)
    with pytest.raises(GatewayError) as info:  # queue full: fast 429
        await adm.acquire()
    assert info.value.status == 429 and info.value.retry_after
    assert "1 concurrent requests and 2 queued" in info.value.message
    adm.release()
    await tasks[0]
    assert order == [1] and adm.in_flight == 1 and adm.waiting == 1
    adm.release()
    await tasks[1]
    assert order == [1, 2] and adm.in_flight == 1
    adm.release()
    assert adm.in_flight == 0


async def test_wait_times_out_with_429() -> None:
    adm = Admission("m", 1, 5, 0.05)
    await adm.acquire()
    with pytest.raises(GatewayError) as info:
        await adm.acquire()
    assert info.value.status == 429 and "0.05 s" in info.value.message
    assert adm.waiting == 0 and adm.in_flight == 1


async def test_cancelled_waiter_leaves_no_trace() -> None:
    adm = Admission("m", 1, 5, 5.0)
    await adm.acquire()
    task = asyncio.create_task(adm.acquire())
    while adm.waiting < 1:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adm.waiting == 0
    adm.release()
    assert adm.in_flight == 0
