"""Proxy overhead: the simulator direct vs through nginx, vLLM's Rust router and the gateway.

    python benchmarks/proxy_overhead.py            # about 5-7 minutes on 2 cores
    python benchmarks/proxy_overhead.py --rounds 3 --scale 0.5 --profiles paced

Two upstream profiles, one after the other, each with its own processes:

- `zero-delay`: a simulator (`python -m vllm_sim`, 32 tokens per answer) that sends every
  event at once; streamed chat at concurrency 1, 16 and 64, non-streamed chat at 16;
- `paced`: the same simulator with its events 5 ms apart (`--paced-itl-ms`), as a real engine
  sends tokens; streamed chat at concurrency 64. Here every event wakes the proxy: this is
  the per-token relay cost.

In each profile the simulator is the upstream of every proxy: nginx (benchmarks/nginx.conf:
proxy_buffering off, keep-alive upstream), vLLM's Rust router (`vllm-router`, one worker,
round robin; skipped with a note when it is not installed, see `--router-bin`) and the gateway
(`python -m gateway`, a registry whose model has `url = <sim>`; `--gateway` adds more, e.g.
an older commit). In interleaved rounds (target order rotated each round) the load generator
(benchmarks/loadgen.py) runs every scenario against every target. Per scenario and target it
prints req/s and its ratio to direct, TTFT and end-to-end p50/p99, errors, the latency added
over direct (median over rounds of the per-round p50 difference), the proxy's CPU seconds per
1000 requests and its RSS after each round, then issue 11's targets per gateway and one JSON
line (`{"benchmark": "proxy_overhead", ...}`). Beside the paced CPU target it prints how the
gateway/router ratio spreads round by round: on a shared machine a process's CPU per request
moves by 10-30 % between rounds (benchmarks/instructions.py counts what does not).

Nothing is installed by this script except nginx (apt, as root, when missing). The router
lives in its own virtual environment: `python3 -m venv /tmp/router-venv &&
/tmp/router-venv/bin/pip install vllm-router==0.1.17`, then `--router-bin
/tmp/router-venv/bin/vllm-router` (or `VLLM_ROUTER_BIN`, or `vllm-router` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import RunResult, chat_request, install_fast_loop, percentile, run_load
from procs import (
    ROUTER_INSTALL,
    Proc,
    Procs,
    find_router,
    machine_busy_seconds,
    pin,
    self_cpu_seconds,
)

MODEL = "bench"


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    concurrency: int
    requests: int


SCENARIOS = (
    Scenario("stream c=1", True, 1, 300),
    Scenario("stream c=16", True, 16, 1500),
    Scenario("stream c=64", True, 64, 3000),
    Scenario("unary c=16", False, 16, 1500),
)
PACED_SCENARIOS = (Scenario("paced stream c=64", True, 64, 1000),)
PROFILES = ("zero-delay", "paced")
PROXIES = ("nginx", "router")


@dataclass
class Sample:
    """One run of one scenario against one target."""

    result: RunResult
    proxy_cpu: float | None
    sim_cpu: float
    client_cpu: float
    rss_after: int | None


@dataclass
class Target:
    name: str
    port: int
    proxy: Proc | None
    samples: dict[str, list[Sample]] = field(default_factory=dict)


def ms(x: float) -> float:
    return round(x * 1000, 3)


async def run_one(target: Target, sc: Scenario, sim: Proc, max_tokens: int) -> Sample:
    request = chat_request("127.0.0.1", target.port, MODEL, stream=sc.stream,
                           max_tokens=max_tokens)
    cpu0 = target.proxy.cpu() if target.proxy else None
    sim0, me0 = sim.cpu(), self_cpu_seconds()
    result = await run_load("127.0.0.1", target.port, request, concurrency=sc.concurrency,
                            total=sc.requests, stream=sc.stream, deadline_s=90)
    proxy_cpu = target.proxy.cpu() - cpu0 if target.proxy and cpu0 is not None else None
    return Sample(result, proxy_cpu, sim.cpu() - sim0, self_cpu_seconds() - me0,
                  target.proxy.rss() if target.proxy else None)


def summarize(targets: list[Target], sc: Scenario) -> dict[str, dict[str, Any]]:
    direct = targets[0].samples[sc.name]
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        samples = t.samples[sc.name]
        ttft = [x for s in samples for x in s.result.ttft]
        e2e = [x for s in samples for x in s.result.e2e]
        n = sum(s.result.requests for s in samples)
        row: dict[str, Any] = {
            "requests": n,
            "errors": sum(s.result.errors for s in samples),
            "rps": round(statistics.median(s.result.rps for s in samples), 1),
            "rps_vs_direct": round(statistics.median(
                s.result.rps / d.result.rps if d.result.rps else 0.0
                for s, d in zip(samples, direct, strict=True)), 3),
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "e2e_p50_ms": ms(percentile(e2e, 50)), "e2e_p99_ms": ms(percentile(e2e, 99)),
            "client_cpu_s_per_1000": round(1000 * sum(s.client_cpu for s in samples) / n, 3)
            if n else None,
            "sim_cpu_s_per_1000": round(1000 * sum(s.sim_cpu for s in samples) / n, 3)
            if n else None,
        }
        if t.proxy is not None:
            added_ttft = [percentile(s.result.ttft, 50) - percentile(d.result.ttft, 50)
                          for s, d in zip(samples, direct, strict=True)]
            added_e2e = [percentile(s.result.e2e, 50) - percentile(d.result.e2e, 50)
                         for s, d in zip(samples, direct, strict=True)]
            rss = [s.rss_after for s in samples if s.rss_after]
            row.update({
                "added_ttft_p50_ms": ms(statistics.median(added_ttft)),
                "added_e2e_p50_ms": ms(statistics.median(added_e2e)),
                "proxy_cpu_s_per_1000": round(
                    1000 * sum(s.proxy_cpu or 0.0 for s in samples) / n, 3) if n else None,
                "proxy_cpu_s_per_1000_by_round": [
                    round(1000 * (s.proxy_cpu or 0.0) / s.result.requests, 3)
                    for s in samples if s.result.requests],
                "proxy_rss_mib": [round(r / 2**20, 1) for r in rss],
                "rss_growth_pct": round(100 * (rss[-1] - rss[0]) / rss[0], 1) if rss else None,
            })
        errs = [e for s in samples for e in s.result.error_samples][:3]
        if errs:
            row["error_samples"] = errs
        out[t.name] = row
    return out


def print_table(sc: Scenario, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n## {sc.name} ({'streamed' if sc.stream else 'non-streamed'} chat, "
          f"{sc.requests} requests per round)")
    head = ("target", "req/s", "vs direct", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99",
            "errors", "+TTFT p50", "+e2e p50", "CPU s/1000", "RSS MiB (first..last)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        rss = r.get("proxy_rss_mib") or []
        cells = [name, f"{r['rps']:.0f}", f"{r['rps_vs_direct']:.2f}",
                 f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p99_ms']:.2f}",
                 f"{r['e2e_p50_ms']:.2f}", f"{r['e2e_p99_ms']:.2f}", str(r["errors"]),
                 f"{r['added_ttft_p50_ms']:+.2f}" if "added_ttft_p50_ms" in r else "-",
                 f"{r['added_e2e_p50_ms']:+.2f}" if "added_e2e_p50_ms" in r else "-",
                 f"{r['proxy_cpu_s_per_1000']:.2f}" if r.get("proxy_cpu_s_per_1000") is not None
                 else "-",
                 f"{rss[0]:.0f}..{rss[-1]:.0f} ({r['rss_growth_pct']:+.1f}%)" if rss else "-"]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def paired(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """The two targets' CPU per request round by round (each round runs both, one after the
    other): how the ratio spreads shows how much of a difference the machine's own
    round-to-round noise can hide."""
    ratios = [a / b for a, b in zip(ours["proxy_cpu_s_per_1000_by_round"],
                                    theirs["proxy_cpu_s_per_1000_by_round"], strict=True) if b]
    if not ratios:
        return {}
    return {"ratio_by_round_median": round(statistics.median(ratios), 3),
            "ratio_by_round_range": [round(min(ratios), 2), round(max(ratios), 2)],
            "rounds_at_or_below": f"{sum(r <= 1 for r in ratios)}/{len(ratios)}"}


def check_targets(results: dict[str, dict[str, dict[str, Any]]],
                  gateways: list[str]) -> dict[str, dict[str, Any]]:
    """Issue 11's targets, per gateway target (the router's figures from the same rounds)."""
    out: dict[str, dict[str, Any]] = {}
    for gw in gateways:
        checks: dict[str, Any] = {}
        paced = results.get("paced stream c=64", {})
        if gw in paced and "router" in paced:
            ours, theirs = (paced[gw]["proxy_cpu_s_per_1000"],
                            paced["router"]["proxy_cpu_s_per_1000"])
            checks["paced_c64_cpu_per_1000_at_most_router"] = {
                "gateway": ours, "router": theirs, "met": ours <= theirs,
                **paired(paced[gw], paced["router"])}
        c64 = results.get("stream c=64", {})
        if gw in c64 and "router" in c64:
            ours, theirs = c64[gw]["rps_vs_direct"], c64["router"]["rps_vs_direct"]
            checks["c64_throughput_vs_direct_at_least_router"] = {
                "gateway": ours, "router": theirs, "met": ours >= theirs}
        c1 = results.get("stream c=1", {}).get(gw)
        if c1:
            checks["c1_added_ttft_p50_at_most_0.5ms"] = {
                "value_ms": c1["added_ttft_p50_ms"], "met": c1["added_ttft_p50_ms"] <= 0.5}
        rows = [r[gw] for r in results.values() if r.get(gw, {}).get("proxy_rss_mib")]
        if rows:
            peak = max(max(r["proxy_rss_mib"]) for r in rows)
            growth = max(r["rss_growth_pct"] for r in rows)
            checks["rss_at_most_100mib_and_flat"] = {
                "max_mib": peak, "max_growth_pct": growth, "met": peak <= 100 and growth < 10}
        out[gw] = checks
    return out


async def run_profile(args: argparse.Namespace, profile: str, router_bin: str | None,
                      results: dict[str, dict[str, dict[str, Any]]],
                      machine: dict[str, Any]) -> list[str]:
    """Start the simulator and every proxy for `profile`, run its scenarios in interleaved
    rounds into `results`, stop them all; the names of the gateway targets."""
    paced = profile == "paced"
    itl = args.paced_itl_ms if paced else args.itl_ms
    base = PACED_SCENARIOS if paced else SCENARIOS
    scenarios = [Scenario(s.name, s.stream, s.concurrency, max(1, int(s.requests * args.scale)))
                 for s in base if not args.only or s.name in args.only]
    if not scenarios:
        return []
    procs = Procs()
    try:
        sim = procs.start_sim(MODEL, ttft_ms=args.ttft_ms, itl_ms=itl)
        sim_url = f"http://127.0.0.1:{sim.port}"
        targets = [Target("direct", sim.port, None)]
        if "nginx" in args.targets:
            nginx = procs.start_nginx(sim.port, workers=args.nginx_workers)
            targets.append(Target("nginx", nginx.port, nginx))
        if "router" in args.targets and router_bin:
            router = procs.start_router(sim_url, router_bin)
            targets.append(Target("router", router.port, router))
        for spec in args.gateway or ["gateway"]:
            name, _, env_text = spec.partition(":")
            name, _, src = name.partition("@")
            env = dict(kv.split("=", 1) for kv in env_text.split(",") if kv)
            gw = procs.start_gateway(sim_url, MODEL, env, name=name,
                                     source=Path(src) if src else None)
            targets.append(Target(name, gw.port, gw))
        if args.pin:  # simulator and load generator on CPU 0, every proxy on CPU 1
            pin([*sim.pids(), os.getpid()], {0})
            for t in targets:
                if t.proxy:
                    pin(t.proxy.pids(), {1})
        print(f"# {profile}: {len(targets)} targets, {args.rounds} rounds, "
              f"{args.max_tokens} tokens per answer, sim TTFT {args.ttft_ms} ms ITL {itl} ms, "
              f"client loop {args.client_loop}, pinned {args.pin}", file=sys.stderr)
        warm = chat_request("127.0.0.1", 0, MODEL, stream=True, max_tokens=args.max_tokens)
        for t in targets:  # warm-up: connections, pools, caches
            req = warm.replace(b"Host: 127.0.0.1:0", f"Host: 127.0.0.1:{t.port}".encode())
            await run_load("127.0.0.1", t.port, req, concurrency=16,
                           total=100 if paced else 300, stream=True)
        ours = [sim, *(t.proxy for t in targets if t.proxy)]
        busy0, ours0, me0 = machine_busy_seconds(), sum(p.cpu() for p in ours), self_cpu_seconds()
        load0, t0 = os.getloadavg()[0], time.monotonic()
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for sc in scenarios:
                for t in order:
                    sample = await run_one(t, sc, sim, args.max_tokens)
                    t.samples.setdefault(sc.name, []).append(sample)
            print(f"# {profile}: round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        wall = time.monotonic() - t0
        others = (machine_busy_seconds() - busy0) - (sum(p.cpu() for p in ours) - ours0) - (
            self_cpu_seconds() - me0)
        machine[profile] = {"loadavg_1m_start": round(load0, 2),
                            "loadavg_1m_end": round(os.getloadavg()[0], 2),
                            "other_processes_cores_avg": round(max(others, 0.0) / wall, 2),
                            "duration_s": round(wall, 1)}
        print(f"# {profile}: {machine[profile]}")
        for sc in scenarios:
            results[sc.name] = summarize(targets, sc)
            print_table(sc, results[sc.name])
        return [t.name for t in targets if t.name not in ("direct", *PROXIES)]
    finally:
        procs.stop_all()


async def main_async(args: argparse.Namespace) -> int:
    router_bin = find_router(args.router_bin) if "router" in args.targets else None
    if "router" in args.targets and router_bin is None:
        print(f"# vLLM's router not found: measuring without it (install: {ROUTER_INSTALL}; "
              "then --router-bin /tmp/router-venv/bin/vllm-router)", file=sys.stderr)
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "kernel": platform.release()}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    gateways: list[str] = []
    for profile in args.profiles:
        for name in await run_profile(args, profile, router_bin, results, machine):
            if name not in gateways:
                gateways.append(name)
    checks = check_targets(results, gateways)
    print("\n## targets (issue 11)")
    for gw, gw_checks in checks.items():
        for name, c in gw_checks.items():
            print(f"- {gw} {name}: {'MET' if c['met'] else 'NOT MET'} {c}")
    print(json.dumps({"benchmark": "proxy_overhead", "rounds": args.rounds,
                      "max_tokens": args.max_tokens, "sim_ttft_ms": args.ttft_ms,
                      "sim_itl_ms": args.itl_ms, "paced_itl_ms": args.paced_itl_ms,
                      "pinned": args.pin, "gateways": args.gateway or ["gateway"],
                      "router": router_bin is not None,
                      "machine": machine, "results": results, "targets": checks}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES),
                   help="upstream profiles to run, in this order (default: both)")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="simulator VLLM_SIM_TTFT_MS")
    p.add_argument("--itl-ms", type=float, default=0.0,
                   help="simulator VLLM_SIM_ITL_MS in the zero-delay profile")
    p.add_argument("--paced-itl-ms", type=float, default=5.0,
                   help="simulator VLLM_SIM_ITL_MS in the paced profile")
    p.add_argument("--no-nginx", dest="nginx", action="store_false", help="leave nginx out")
    p.add_argument("--no-router", dest="router", action="store_false",
                   help="leave vLLM's router out")
    p.add_argument("--router-bin", help="the `vllm-router` launcher (default: $VLLM_ROUTER_BIN, "
                   "else vllm-router on PATH; missing: the router is left out)")
    p.add_argument("--only", nargs="+", help="scenario names, e.g. 'stream c=64'")
    p.add_argument("--nginx-workers", default="auto")
    p.add_argument("--pin", action="store_true",
                   help="simulator and load generator on CPU 0, the proxy under test on CPU 1 "
                        "(its capacity with a core of its own; 2+ CPUs)")
    p.add_argument("--gateway", action="append", metavar="NAME[@SRC][:KEY=VALUE,...]",
                   help="a gateway target, repeatable (default: one 'gateway' from this "
                        "checkout). @SRC runs the code in directory SRC instead (e.g. an older "
                        "commit unpacked with `git archive`); KEY=VALUE set its environment, "
                        "e.g. --gateway gateway --gateway gw-httpx:GATEWAY_UPSTREAM_CLIENT=httpx")
    args = p.parse_args(argv)
    args.targets = [name for name in PROXIES if getattr(args, name)]
    args.client_loop = install_fast_loop()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
