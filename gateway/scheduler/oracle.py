"""The oracle: the best completion time any policy could reach on a trace known in advance.

Two figures, used by the replay benchmark and its tests:

- `optimum`: the exact shortest makespan of an open-loop trace when one model holds the
  resource at a time (the benchmark's one-core budget), found by searching every schedule:
  which model holds the resource, in what order, and how many of its requests each turn
  serves. It may starve a model for as long as it likes; it only minimises the time by which
  the last answer is done, so no policy that bounds waits can beat it.
- `lower_bound`: a cheaper bound for any budget (several models awake at once), looser.

The search (exact under these rules, which the simulated world of `replay.py` also follows):
a model serves its own requests first come, first served, `max_concurrency` at a time, each
as soon as it has arrived and a slot is free; a turn ends when its last answer is done (a
busy model is never evicted); a switch takes the eviction of the model before plus the
bring-up of the next (a wake for a sleep-mode model that was up before, else a load). With
equal service times within a model, serving first come first served loses nothing, so the
optimum is exact; `optimum` refuses traces where one model's services differ. State: which
model turns next, how many of each model's requests are answered, and which models were ever
up; for each state only the earliest time it can be reached matters (everything after is
monotone in it), so a dynamic programme over states ordered by answered count is exact.
Cost: the product of (requests + 1) over the models times their number; a few hundred
thousand states for the benchmark's traces, well under a second each.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence

from gateway.scheduler.replay import SimModel, SimRequest

_UNLIMITED = 1 << 30


def optimum(requests: Sequence[SimRequest], models: Sequence[SimModel],
            awake: Iterable[str] = ()) -> float:
    """The shortest makespan (from 0, when `awake` holds the resource) with one model up at a
    time. Raises ValueError when a model's services differ or two models start awake."""
    specs = {m.name: m for m in models}
    up0 = [n for n in awake if n in specs]
    if len(up0) > 1:
        raise ValueError(f"one model at a time: {up0} cannot all start awake")
    arrivals: dict[str, list[float]] = {}
    service: dict[str, float] = {}
    for r in sorted(requests, key=lambda r: r.at):
        if r.model not in specs:
            continue
        if service.setdefault(r.model, r.service) != r.service:
            raise ValueError(f"`{r.model}`'s requests take different times: the search is "
                             f"exact only for equal services per model")
        arrivals.setdefault(r.model, []).append(r.at)
    if not arrivals:
        return 0.0
    names = sorted(arrivals)
    index = {n: i for i, n in enumerate(names)}
    counts = tuple(len(arrivals[n]) for n in names)

    def turn(name: str, start: float, first: int) -> Iterator[tuple[int, float]]:
        """A turn of `name` from `start`: (k, when its answers first..k-1 are all done), for
        every k after `first` (the turn may end after any of them)."""
        times, cost = arrivals[name], service[name]
        slots = [start] * min(specs[name].max_concurrency or _UNLIMITED, len(times) - first)
        end = start
        for k in range(first, len(times)):
            begin = max(times[k], heapq.heappop(slots))
            heapq.heappush(slots, begin + cost)
            end = max(end, begin + cost)
            yield k + 1, end

    def bring_up(name: str, ever: frozenset[str]) -> float:
        spec = specs[name]
        return spec.wake if spec.sleep_mode and name in ever else spec.load

    # layers[answered][(next model, answered per model, ever up)] = earliest start of its turn
    Key = tuple[str, tuple[int, ...], frozenset[str]]
    layers: list[dict[Key, float]] = [{} for _ in range(sum(counts) + 1)]
    zero = tuple(0 for _ in names)
    ever0 = frozenset(up0)
    for name in names:
        if up0 and name == up0[0]:
            start = 0.0
        elif up0:
            start = specs[up0[0]].evict + bring_up(name, ever0)
        else:
            start = bring_up(name, ever0)
        layers[0][(name, zero, ever0 | {name})] = start
    result = float("inf")
    for layer in layers:
        for (name, done, ever), start in layer.items():
            i = index[name]
            for last, end in turn(name, start, done[i]):
                after = (*done[:i], last, *done[i + 1:])
                if after == counts:
                    result = min(result, end)
                    continue
                for other in names:
                    j = index[other]
                    if other == name or after[j] == counts[j]:
                        continue
                    key = (other, after, ever | {other})
                    at = end + specs[name].evict + bring_up(other, ever)
                    later = layers[sum(after)]
                    if at < later.get(key, float("inf")):
                        later[key] = at
        layer.clear()
    return result


def lower_bound(requests: Sequence[SimRequest], models: Sequence[SimModel], budget: int,
                awake: Iterable[str] = ()) -> float:
    """A lower bound of the time (from 0, when `awake` hold the resource) by which every
    request of an open-loop trace can have been answered, whatever the policy, even one that
    knows the whole trace in advance.

    Take any time t (0 or an arrival). The requests arriving at t or later cannot start before
    t, and after t they still need:
    - service: a model is up for at least its requests' total service time divided over its
      concurrency, and for at least its longest request;
    - bring-ups: of the k distinct models they ask for, at most `cap` hold the resource at t
      (the most of them that fit the budget together), so k - cap of them need a bring-up
      each (at t = 0, every one not in `awake`) (the cheapest: a wake for a sleep-mode model, else a
      load), one at a time (the fleet switches one model at a time). At t = 0 with one model
      at a time, each bring-up also evicts the model before it; later the evictions may have
      happened before t, so they are not counted.
    With room for one model at a time (cap 1), service and bring-ups cannot overlap: the bound
    at t is t + total service + bring-ups; with room for several, t + the largest of (total
    service / cap, the longest model's service (at t = 0 after its bring-up), the
    bring-ups). The result is the largest over every t, and at least each request's arrival
    plus its service. Work left over from requests that arrived before t is ignored, which
    keeps each term a lower bound.
    """
    specs = {m.name: m for m in models}
    if not requests:
        return 0.0
    ordered = sorted(requests, key=lambda r: r.at)
    best = max(r.at + r.service for r in ordered)
    up = {n for n in awake if n in specs}

    def bring_up(name: str, first: bool) -> float:
        spec = specs[name]
        cost = spec.wake if spec.sleep_mode and not first else spec.load
        return cost

    def capacity(names: Iterable[str]) -> int:
        used, count = 0, 0
        for size in sorted(specs[n].size for n in names):
            used += size
            if used > budget:
                break
            count += 1
        return max(1, count)

    # suffix sums, walking the trace backwards: per model (total service, longest)
    work: dict[str, float] = {}
    longest: dict[str, float] = {}
    starts = sorted({0.0, *(r.at for r in ordered)}, reverse=True)
    i = len(ordered) - 1
    for t in starts:
        while i >= 0 and ordered[i].at >= t:
            r = ordered[i]
            if r.model in specs:
                work[r.model] = work.get(r.model, 0.0) + r.service
                longest[r.model] = max(longest.get(r.model, 0.0), r.service)
            i -= 1
        if not work:
            continue
        names = list(work)
        per_model = {n: max(work[n] / (specs[n].max_concurrency or 1_000_000), longest[n])
                     for n in names}
        cap = capacity(names)
        if t == 0.0:
            cold = [n for n in names if n not in up]
            ups = sum(bring_up(n, True) for n in cold)
            if cap == 1 and up and cold:  # each bring-up evicts the model before it
                ups += len(cold) * min(specs[n].evict for n in specs)
        else:
            costs = sorted(bring_up(n, False) for n in names)
            ups = sum(costs[:max(0, len(names) - cap)])
        service = sum(per_model.values())
        if cap == 1:
            best = max(best, t + service + ups)
        else:
            own = max(per_model.values())
            if t == 0.0:  # a model not awake at 0 is brought up before it serves
                own = max([own, *(bring_up(n, True) + per_model[n] for n in names
                                  if n not in up)])
            best = max(best, t + max(service / cap, own, ups))
    return best
