"""User-space instructions per streamed request, under callgrind: the gateway beside vLLM's router.

    python benchmarks/instructions.py --router-bin /tmp/router-venv/bin/vllm-router
    python benchmarks/instructions.py --gateway old@/tmp/old-tree --tokens 8 32

CPU seconds per request (benchmarks/proxy_overhead.py) are what a user pays, but on a shared
or virtual machine they move by 10-30 % from one round to the next for the same process, which
hides any difference smaller than that. The number of instructions a process runs in user
space does not: callgrind counts them, and two runs of one tree give the same figure to within
0.1 %. It says nothing of system time (the reads and writes, the same in number for both
proxies; see proxy_overhead.py for those).

Per target (`gateway` from this checkout, `--gateway NAME@SRC` for another tree, `router` when
`--router-bin` is given) and per answer length (`--tokens`, events 5 ms apart as in
proxy_overhead's paced profile): a simulator, the target under `valgrind --tool=callgrind`,
a warm-up of 100 requests, counters zeroed, `--requests` streamed chat requests at
concurrency 4, counters dumped. With two or more lengths it also splits the cost into a part
per request and a part per relayed event (a straight line through the first and last length).

valgrind must be installed (Debian: apt-get install valgrind). A run takes 1-2 minutes per
target and length; the processes run about 50 times slower under callgrind, so the paced
events still arrive one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import chat_request, install_fast_loop, run_load
from procs import Procs, find_router

MODEL = "bench"


def summary(out: Path) -> int:
    """The instruction total of callgrind's dump `out` (its `summary:` line)."""
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {out}")


def measure(name: str, source: Path | None, router_bin: str | None, tokens: int,
            requests: int, itl_ms: float) -> float:
    """Instructions per request of one target at one answer length (its own processes,
    stopped before it returns)."""
    procs = Procs()
    try:
        return _measure(procs, name, source, router_bin, tokens, requests, itl_ms)
    finally:
        procs.stop_all()


def _measure(procs: Procs, name: str, source: Path | None, router_bin: str | None, tokens: int,
             requests: int, itl_ms: float) -> float:
    sim = procs.start_sim(MODEL, itl_ms=itl_ms)
    url = f"http://127.0.0.1:{sim.port}"
    out = procs.workdir / f"callgrind.{name}.{tokens}"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if router_bin is not None:
        target = procs.start_router(url, router_bin, wrapper=valgrind, ready_s=300)
    else:
        target = procs.start_gateway(url, MODEL, name=name, source=source, wrapper=valgrind,
                                     ready_s=300)
    port = target.port
    request = chat_request("127.0.0.1", port, MODEL, stream=True, max_tokens=tokens)
    asyncio.run(run_load("127.0.0.1", port, request, concurrency=4, total=100,
                         stream=True, timeout_s=120))
    pid = str(target.process.pid)
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    result = asyncio.run(run_load("127.0.0.1", port, request, concurrency=4,
                                  total=requests, stream=True, timeout_s=120))
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} failed requests: "
                           f"{result.error_samples[:3]}")
    dump = Path(f"{out}.1")
    deadline = time.monotonic() + 30
    while "summary:" not in (dump.read_text() if dump.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no dump to {dump}")
        time.sleep(0.2)
    return summary(dump) / requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 32],
                   help="answer lengths (events per answer) to measure")
    p.add_argument("--requests", type=int, default=200, help="measured requests per run")
    p.add_argument("--itl-ms", type=float, default=5.0, help="simulator's time between events")
    p.add_argument("--gateway", action="append", metavar="NAME[@SRC]",
                   help="a gateway target, repeatable (default: 'gateway', this checkout)")
    p.add_argument("--router-bin", help="vLLM's `vllm-router` launcher (else $VLLM_ROUTER_BIN "
                   "or vllm-router on PATH; missing: the router is left out)")
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found: install valgrind (apt-get install valgrind)",
                  file=sys.stderr)
            return 2
    targets: list[tuple[str, Path | None, str | None]] = []
    for spec in args.gateway or ["gateway"]:
        name, _, src = spec.partition("@")
        if src and not (Path(src) / "gateway").is_dir():
            print(f"error: --gateway {spec}: {src} has no gateway/ package", file=sys.stderr)
            return 2
        targets.append((name, Path(src).resolve() if src else None, None))
    router = find_router(args.router_bin)
    if router is not None:
        targets.append(("router", None, router))
    else:
        print("# vLLM's router not found: measuring without it (see --router-bin)",
              file=sys.stderr)
    install_fast_loop()
    rows: dict[str, dict[int, float]] = {}
    for name, source, router_bin in targets:
        for tokens in args.tokens:
            per = measure(name, source, router_bin, tokens, args.requests, args.itl_ms)
            rows.setdefault(name, {})[tokens] = per
            print(f"# {name}, {tokens} events: {per / 1000:.1f}k instructions per request",
                  file=sys.stderr)
    lengths = sorted(args.tokens)
    split = len(lengths) >= 2 and lengths[0] != lengths[-1]
    head = ["target", *(f"{t} events" for t in lengths)]
    if split:
        head += ["per event", "per request"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    out: dict[str, dict[str, float]] = {}
    for name, by_len in rows.items():
        cells = [name, *(f"{by_len[t] / 1000:.1f}k" for t in lengths)]
        out[name] = {str(t): round(by_len[t]) for t in lengths}
        if split:
            lo, hi = lengths[0], lengths[-1]
            per_event = (by_len[hi] - by_len[lo]) / (hi - lo)
            fixed = by_len[lo] - lo * per_event
            cells += [f"{per_event / 1000:.1f}k", f"{fixed / 1000:.0f}k"]
            out[name].update(per_event=round(per_event), per_request=round(fixed))
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"benchmark": "instructions", "itl_ms": args.itl_ms,
                      "requests": args.requests, "instructions_per_request": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
