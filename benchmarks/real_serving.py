"""Real serving: vLLM's own benchmark client against real vLLM (CPU), direct vs through the gateway.

    python benchmarks/real_serving.py                   # tiny-b, 3 rounds, about 3-4 minutes
    python benchmarks/real_serving.py --model tiny-a --num-prompts 100 --concurrency 16

Needs the image `vllm-fleet/vllm-cpu:0.32.0` (bash scripts/build-vllm-image.sh) and the tiny
models (python3 scripts/make_tiny_models.py). The model runs as the fleet runs it (`fleet up`
with a registry like models.cpu.toml: float32, --enforce-eager, one pinned core). The client is
vLLM's serving benchmark (`vllm.benchmarks.serve`, `--backend openai-chat --dataset-name
random`), run inside the same image (the host needs no vLLM), on the host network. In
interleaved rounds it measures the model directly and through `python -m gateway`: request
throughput, output tokens/s, TTFT, TPOT, ITL and end-to-end latency (median and p99), and the
gateway's and the engine's CPU seconds per 1000 requests (/proc of their process trees,
sampled around every run). Prints a table and one JSON line; removes every container it made
(label `io.vllm-fleet.bench=<run id>`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetbench import (
    BENCH_LABEL,
    REPO,
    VLLM_IMAGE,
    Fleet,
    docker,
    docker_binary,
    image_exists,
    vllm_registry,
)
from procs import Procs, cpu_seconds, descendants, free_port

METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
           "p99_e2el_ms")


def engine_pids(fleet: Fleet) -> list[int]:
    ids = docker("ps", "-q", "--filter", f"label={fleet.label}").split()
    pids: list[int] = []
    for cid in ids:
        pid = docker("inspect", "-f", "{{.State.Pid}}", cid).strip()
        if pid.isdigit() and int(pid) > 0:
            pids += descendants(int(pid))
    return pids


def bench_args(name: str, base_url: str, model: str, args: argparse.Namespace) -> list[str]:
    return ["--backend", "openai-chat", "--base-url", base_url,
            "--endpoint", "/v1/chat/completions", "--model", model,
            "--tokenizer", f"/models/{model}", "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
            "--ignore-eos", "--seed", str(args.seed), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", "/out", "--result-filename", f"{name}.json"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-b", choices=["tiny-a", "tiny-b"],
                   help="tiny-b streams token by token (~10 ms/token); tiny-a is ~1.5 ms/token")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if not image_exists(VLLM_IMAGE):
        print(f"real_serving: image {VLLM_IMAGE} missing: run bash scripts/build-vllm-image.sh",
              file=sys.stderr)
        return 1
    models_dir = REPO / "models"
    if not (models_dir / args.model / "config.json").exists():
        print(f"real_serving: models/{args.model} missing: run python3 scripts/make_tiny_models.py",
              file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="fleet-real-bench-"))
    out = workdir / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    port = free_port()
    fleet = Fleet(workdir, vllm_registry([port], [args.model], sleep_mode=False,
                                         models_dir=models_dir, host_cpus=2))
    procs = Procs()
    client_name = f"bench-{fleet.run_id}-client"
    samples: dict[str, dict[str, float]] = {}
    t_start = time.monotonic()
    try:
        wall, _ = fleet.run("up", args.model, timeout=600)
        print(f"# fleet up {args.model}: healthy in {wall:.1f} s", file=sys.stderr)
        gw = procs.start_gateway("", name="gateway", registry_path=fleet.registry,
                                 env={"GATEWAY_ACTIVATION": "false"})
        targets = {"direct": f"http://127.0.0.1:{port}", "gateway": f"http://127.0.0.1:{gw.port}"}
        runs = []
        for rnd in range(args.rounds):
            order = ["direct", "gateway"] if rnd % 2 == 0 else ["gateway", "direct"]
            for target in order:
                name = f"{target}-{rnd}"
                runs.append({"name": name,
                             "args": bench_args(name, targets[target], args.model, args)})
        (out / "plan.json").write_text(json.dumps({"runs": runs}))
        cmd = [docker_binary(), "run", "--rm", "--name", client_name, "--network", "host",
               "--label", f"{BENCH_LABEL}={fleet.run_id}",
               "-v", f"{models_dir}:/models:ro", "-v", f"{out}:/out",
               "-v", f"{Path(__file__).resolve().parent / 'vllm_bench_driver.py'}:/driver.py:ro",
               "-e", "HF_HUB_OFFLINE=1", "--entrypoint", "python3", VLLM_IMAGE,
               "/driver.py", "/out/plan.json"]
        engine = engine_pids(fleet)
        log = (workdir / "client.log").open("w")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        begin: dict[str, tuple[float, float, float]] = {}
        for line in proc.stdout:
            word, _, name = line.strip().partition(" ")
            if word not in ("BEGIN", "END"):
                continue
            now = (gw.cpu(), cpu_seconds(engine), time.monotonic())
            if word == "BEGIN":
                begin[name] = now
                print(f"# {name} ...", file=sys.stderr)
            else:
                b = begin[name]
                samples[name] = {"gateway_cpu_s": now[0] - b[0], "engine_cpu_s": now[1] - b[1],
                                 "wall_s": now[2] - b[2], "gateway_rss": gw.rss()}
        code = proc.wait(timeout=60)
        log.close()
        if code != 0:
            print((workdir / "client.log").read_text()[-4000:], file=sys.stderr)
            return 1
    finally:
        procs.stop_all()
        docker("rm", "-f", client_name, check=False)
        fleet.cleanup()

    results: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    for name, sample in samples.items():
        data = json.loads((out / f"{name}.json").read_text())
        row = {k: data.get(k) for k in METRICS}
        row.update(completed=data.get("completed"), failed=data.get("failed", 0),
                   **{k: round(v, 3) for k, v in sample.items() if k != "gateway_rss"})
        row["gateway_rss_mib"] = round(sample["gateway_rss"] / 2**20, 1)
        results[name.rsplit("-", 1)[0]].append(row)

    summary: dict[str, dict[str, Any]] = {}
    for target, rows in results.items():
        s: dict[str, Any] = {k: round(statistics.median(r[k] for r in rows), 3)
                             for k in METRICS if all(r[k] is not None for r in rows)}
        done = sum(r["completed"] or 0 for r in rows)
        s["completed"], s["failed"] = done, sum(r["failed"] or 0 for r in rows)
        s["engine_cpu_s_per_1000"] = round(1000 * sum(r["engine_cpu_s"] for r in rows) / done, 2)
        if target == "gateway":
            s["gateway_cpu_s_per_1000"] = round(
                1000 * sum(r["gateway_cpu_s"] for r in rows) / done, 3)
            s["gateway_rss_mib"] = [r["gateway_rss_mib"] for r in rows]
        summary[target] = s
    d, g = summary["direct"], summary["gateway"]
    delta = {k: round(g[k] - d[k], 3) for k in METRICS if k in d and k in g}

    print(f"\n## real vLLM 0.32.0 CPU, model {args.model}, {args.rounds} rounds x "
          f"{args.num_prompts} prompts, concurrency {args.concurrency}, input {args.input_len} "
          f"/ output {args.output_len} tokens, load avg {os.getloadavg()[0]:.2f}")
    cols = ("target", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50",
            "ITL p99", "e2e p50", "failed", "engine CPU s/1000", "gateway CPU s/1000")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for target, s in (("direct", d), ("gateway", g), ("gateway - direct", delta)):
        def f(k: str, s: dict[str, Any] = s) -> str:
            return "-" if s.get(k) is None else f"{s[k]:.2f}"

        print("| " + " | ".join([target, f("request_throughput"), f("output_throughput"),
                                 f("median_ttft_ms"), f("p99_ttft_ms"), f("median_tpot_ms"),
                                 f("median_itl_ms"), f("p99_itl_ms"), f("median_e2el_ms"),
                                 str(s.get("failed", "-")), f("engine_cpu_s_per_1000"),
                                 f("gateway_cpu_s_per_1000")]) + " |")
    print(json.dumps({"benchmark": "real_serving", "model": args.model, "rounds": args.rounds,
                      "num_prompts": args.num_prompts, "concurrency": args.concurrency,
                      "input_len": args.input_len, "output_len": args.output_len,
                      "duration_s": round(time.monotonic() - t_start, 1),
                      "summary": summary, "gateway_minus_direct": delta, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
