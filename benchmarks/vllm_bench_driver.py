"""Runs vLLM's own serving benchmark several times in one process (inside the vLLM image).

    python3 vllm_bench_driver.py PLAN.json

PLAN: {"runs": [{"name": "...", "args": ["--backend", "openai-chat", ...]}, ...]}. Before and
after each run it prints `BEGIN name` / `END name` on stdout (flushed) so that the caller can
sample CPU counters of the servers around every run; results go where each run's
`--result-dir/--result-filename` say. Importing vLLM once for all runs saves its start-up
(torch) per run.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    with open(sys.argv[1]) as f:
        plan = json.load(f)
    for run in plan["runs"]:
        parser = argparse.ArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(run["args"])
        print(f"BEGIN {run['name']}", flush=True)
        bench_main(args)
        print(f"END {run['name']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
