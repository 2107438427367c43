"""The model scheduler: who holds the GPUs (or cores), who waits, who drains, who is next.

`core` decides (pure: events and a clock in, actions out); `runtime` carries the actions out in
the gateway (admits requests, drives the fleet's switches, reports timings back); `replay`
runs a workload against the core on a simulated clock (tests, benchmarks).

The policy (`fair`):
- A model awake with work and no rival keeps the resource indefinitely.
- A request for a model that is not awake waits in that model's queue. The waiting model whose
  oldest request has waited longest (times its `priority`) is next. The smallest set of awake
  models whose eviction makes room is chosen (pinned models never; among sets of one size:
  fewest with queued work, then least recent demand, then cheapest to bring back).
- Each of them that is idle is evicted at once; one that has work keeps admitting until it
  has held the resource for its quantum, then drains: what it has in flight finishes, new
  requests wait in its own queue. When all are idle the switch starts (one at a time).
- The quantum follows the measured switch cost (`switch_share`: switching takes at most that
  share of the time) with a floor, or a registry override.
- A queued request has a deadline; past it, a 503 (waiting for the model's turn) or 429
  (waiting for a slot of an awake model) with an estimate and where it stood in line. A request
  whose client left is out of its queue at once; a model is never switched in for an empty
  queue, so an abandoned request never triggers or prolongs a switch.
`drain-wait` is the old behaviour (kept for the replay benchmark): a switch waits until the
models in the way happen to be idle; they never drain.
"""
