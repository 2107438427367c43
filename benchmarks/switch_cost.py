"""Switch cost: from `fleet switch MODEL` (or a request for a stopped model) to its first token.

    python benchmarks/switch_cost.py                  # simulator image, about 1-2 minutes
    python benchmarks/switch_cost.py --engine vllm    # real vLLM CPU, about 3-4 minutes
    python benchmarks/switch_cost.py --engine both

Two models that cannot be awake together (`[host] cpus = 1`, each needs 1 core, both with
sleep mode) are switched back and forth with the fleet CLI, covering every way a model comes
up: `create` (no container yet), `start` (its container was stopped), `wake` (it was asleep).
After each switch one streamed chat request goes straight to the model and the time to its
first content token is taken. Then the same through the gateway: a request for a stopped model
makes the gateway activate it through the fleet (on-demand), and the time from sending it to
the first token is taken.

With the simulator image (`vllm-fleet/sim:dev`, load time 0) the engine starts in about the
time a Python process needs to boot, so what is measured is the fleet's own cost. With real
vLLM the engine's start dominates. Split per switch:

- `fleet overhead` = CLI wall time - `healthy` (process start, registry, lock, observing
  Docker, planning, evicting, the Docker create/start calls, health-poll granularity);
- `engine start` = `healthy`: from the container (re)started or woken to its /health 200.

Containers carry `io.vllm-fleet.bench=<run id>` and are removed at the end. Prints a table per
engine and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetbench import (
    REPO,
    SIM_IMAGE,
    VLLM_IMAGE,
    Fleet,
    docker,
    first_token_seconds,
    image_exists,
    sim_registry,
    vllm_registry,
)
from procs import Procs, free_port


def _action_of(report: dict[str, Any] | None, model: str) -> str:
    for action in (report or {}).get("actions", []):
        if action["model"] == model and action["action"] not in ("sleep", "stop"):
            return str(action["action"])
    return "?"


def _evicted(report: dict[str, Any] | None, model: str) -> str:
    acts = [a["action"] for a in (report or {}).get("actions", []) if a["model"] != model]
    return ",".join(acts) or "-"


class Runner:
    def __init__(self, fleet: Fleet, models: list[str], ports: dict[str, int]) -> None:
        self.fleet = fleet
        self.models = models
        self.ports = ports
        self.rows: list[dict[str, Any]] = []

    def url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.ports[model]}"

    def switch(self, model: str, note: str = "") -> dict[str, Any]:
        wall, report = self.fleet.run("switch", model)
        ttft = first_token_seconds(self.url(model), model)
        timings = (report or {}).get("timings", {})
        row = {"path": "fleet switch", "model": model, "came_up_by": _action_of(report, model),
               "evicted_by": _evicted(report, model), "wall_s": round(wall, 3),
               "timings": timings, "first_token_after_s": round(ttft, 3),
               "switch_to_first_token_s": round(wall + ttft, 3),
               "fleet_overhead_s": round(wall - timings.get("healthy", 0.0), 3),
               "engine_start_s": round(timings.get("healthy", 0.0), 3), "note": note}
        self.rows.append(row)
        print(f"# switch {model}: {row['came_up_by']} in {wall:.2f} s "
              f"({self.fleet.run_id}), first token +{ttft:.3f} s", file=sys.stderr)
        return row

    def remove(self, model: str) -> None:
        ids = docker("ps", "-aq", "--filter", f"label={self.fleet.label}",
                     "--filter", f"label=io.vllm-fleet.model={model}").split()
        if ids:
            docker("rm", "-f", *ids)

    def stop(self, model: str) -> None:
        ids = docker("ps", "-q", "--filter", f"label={self.fleet.label}",
                     "--filter", f"label=io.vllm-fleet.model={model}").split()
        if ids:
            docker("stop", "-t", "10", *ids)

    def on_demand(self, gateway_url: str, model: str, came_up_by: str,
                  timeout: float = 600.0) -> dict[str, Any]:
        """A streamed request for `model` (stopped or asleep) through the gateway."""
        note = "on-demand activation"
        t0 = time.monotonic()
        try:
            ttft: float | None = first_token_seconds(gateway_url, model, timeout=timeout)
        except httpx.TimeoutException:
            ttft, note = None, f"no first token within {timeout:g} s"
        row = {"path": "request via gateway", "model": model, "came_up_by": came_up_by,
               "evicted_by": "sleep", "wall_s": None, "timings": {},
               "first_token_after_s": None,
               "switch_to_first_token_s": None if ttft is None else round(ttft, 3),
               "fleet_overhead_s": None, "engine_start_s": None, "note": note}
        self.rows.append(row)
        print(f"# request for {model} ({came_up_by}) via the gateway: {note}, "
              f"{time.monotonic() - t0:.2f} s", file=sys.stderr)
        return row


def run_engine(engine: str, repeats: int, workdir: Path,
               asleep_timeout: float) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    if engine == "sim":
        models = ["sim-a", "sim-b"]
        text = sim_registry(ports, sleep_mode=True)
    else:
        models_dir = REPO / "models"
        for m in ("tiny-a", "tiny-b"):
            if not (models_dir / m / "config.json").exists():
                raise SystemExit(f"models/{m} missing: run python3 scripts/make_tiny_models.py")
        models = ["tiny-a", "tiny-b"]
        text = vllm_registry(ports, models, sleep_mode=True, models_dir=models_dir)
    image = SIM_IMAGE if engine == "sim" else VLLM_IMAGE
    if not image_exists(image):
        raise SystemExit(f"image {image} missing: run "
                         + ("bash scripts/build-images.sh" if engine == "sim"
                            else "bash scripts/build-vllm-image.sh"))
    (workdir / engine).mkdir()
    fleet = Fleet(workdir / engine, text)
    a, b = models
    runner = Runner(fleet, models, dict(zip(models, ports, strict=True)))
    procs = Procs()
    t_start = time.monotonic()
    try:
        wall, _ = fleet.run("up", a)
        print(f"# {engine}: up {a} in {wall:.1f} s", file=sys.stderr)
        for _ in range(repeats):
            runner.remove(b)
            runner.switch(b)          # create (a goes to sleep)
            runner.switch(a)          # wake
            runner.switch(b)          # wake
            runner.switch(a)          # wake
            runner.stop(b)
            runner.switch(b)          # start (its container was stopped)
            runner.switch(a)          # wake
        # On demand: a request for a stopped model makes the gateway activate it.
        gw = procs.start_gateway("", name="gateway-activation",
                                 env={**{k: v for k, v in fleet.env.items()
                                         if k.startswith("FLEET_")},
                                      "GATEWAY_ACTIVATION": "true"},
                                 registry_path=fleet.registry)
        gateway_url = f"http://127.0.0.1:{gw.port}"
        for _ in range(repeats):
            runner.stop(b)
            runner.on_demand(gateway_url, b, "start")
            runner.switch(a)
        # b is asleep now (put to sleep by `fleet switch a`, not by the gateway).
        runner.on_demand(gateway_url, b, "wake", timeout=asleep_timeout)
    finally:
        procs.stop_all()
        fleet.cleanup()
    left = fleet.containers()
    return {"engine": engine, "image": image, "rows": runner.rows,
            "duration_s": round(time.monotonic() - t_start, 1), "containers_left": left}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["path"], row["came_up_by"]), []).append(row)
    out = []
    for (path, how), rows in groups.items():
        def med(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
            vals = [r[key] for r in rows if r[key] is not None]
            return round(statistics.median(vals), 3) if vals else None

        def med_t(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
            vals = [r["timings"][key] for r in rows if key in r["timings"]]
            return round(statistics.median(vals), 3) if vals else None

        cli = [r["wall_s"] - r["timings"]["total"] for r in rows if "total" in r["timings"]]
        work = [r["timings"]["total"] - r["timings"].get("evict", 0) - r["timings"].get("start", 0)
                - r["timings"].get("healthy", 0) for r in rows if "total" in r["timings"]]
        notes = sorted({r["note"] for r in rows if r["note"]})
        out.append({"engine": result["engine"], "path": path, "came_up_by": how, "n": len(rows),
                    "wall_s": med("wall_s"),
                    "cli_startup_s": round(statistics.median(cli), 3) if cli else None,
                    "observe_plan_s": round(statistics.median(work), 3) if work else None,
                    "evict_s": med_t("evict"),
                    "start_s": med_t("start"), "healthy_s": med_t("healthy"),
                    "fleet_overhead_s": med("fleet_overhead_s"),
                    "engine_start_s": med("engine_start_s"),
                    "first_token_after_s": med("first_token_after_s"),
                    "to_first_token_s": med("switch_to_first_token_s"),
                    "notes": notes})
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("engine", "path", "came up by", "n", "switch wall", "CLI start-up", "lock+observe+plan",
            "evict", "start (Docker)", "healthy", "fleet overhead", "engine start",
            "first token after", "to first token", "notes")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        print("| " + " | ".join([r["engine"], r["path"], r["came_up_by"], str(r["n"]),
                                 f(r["wall_s"]), f(r["cli_startup_s"]), f(r["observe_plan_s"]),
                                 f(r["evict_s"]), f(r["start_s"]), f(r["healthy_s"]),
                                 f(r["fleet_overhead_s"]), f(r["engine_start_s"]),
                                 f(r["first_token_after_s"]), f(r["to_first_token_s"]),
                                 "; ".join(r["notes"])]) + " |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["sim", "vllm", "both"], default="sim")
    p.add_argument("--repeats", type=int, default=None,
                   help="cycles per engine (default: 3 with the simulator, 1 with vLLM)")
    p.add_argument("--asleep-timeout", type=float, default=20.0,
                   help="how long a request for a model put to sleep by `fleet switch` may "
                        "wait for its first token through the gateway")
    args = p.parse_args(argv)
    engines = ["sim", "vllm"] if args.engine == "both" else [args.engine]
    workdir = Path(tempfile.mkdtemp(prefix="fleet-switch-bench-"))
    results, summary = [], []
    for engine in engines:
        repeats = args.repeats or (3 if engine == "sim" else 1)
        res = run_engine(engine, repeats, workdir, args.asleep_timeout)
        results.append(res)
        rows = summarize(res)
        summary += rows
        print(f"\n## {engine} ({res['image']}), {repeats} cycle(s), {res['duration_s']} s; "
              f"containers left: {len(res['containers_left'])}")
        print_table(rows)
    print(json.dumps({"benchmark": "switch_cost", "summary": summary, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
