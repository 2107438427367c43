"""`GET /metrics`: the vLLM metric names a fleet looks at, in Prometheus text format.

Names, help texts and labels follow vLLM 0.32.0 (`engine="0"`, `model_name` = the first served
name; labels sorted by name as its exposition shows them). Only a subset is exported: the
scheduler gauges, the sleep state, the token counters and the success counter by finish reason.
"""

from __future__ import annotations

from vllm_sim.engine import FINISH_REASONS, Engine

CONTENT_TYPE = b"text/plain; version=1.0.0; charset=utf-8"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(engine: Engine, model_name: str) -> bytes:
    base = f'engine="0",model_name="{_esc(model_name)}"'
    created = f"{engine.started_at:.9e}"
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{{{labels}}} {float(value)}" for labels, value in samples)

    def counter(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name}_total {help_text}")
        lines.append(f"# TYPE {name}_total counter")
        lines.extend(f"{name}_total{{{labels}}} {float(value)}" for labels, value in samples)
        lines.append(f"# HELP {name}_created {help_text}")
        lines.append(f"# TYPE {name}_created gauge")
        lines.extend(f"{name}_created{{{labels}}} {created}" for labels, _ in samples)

    gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
          [(base, engine.running)])
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
          [(base, engine.waiting)])
    level = engine.sleep_level
    gauge("vllm:engine_sleep_state",
          "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
          "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
          [(f'{base},sleep_state="awake"', 1 if level is None else 0),
           (f'{base},sleep_state="weights_offloaded"', 1 if level == 1 else 0),
           (f'{base},sleep_state="discard_all"', 1 if level == 2 else 0)])
    usage = min(1.0, engine.running / engine.max_num_seqs) if engine.max_num_seqs else 0.0
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
          [(base, usage)])
    counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
            [(base, 0)])
    counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
            [(base, engine.prompt_tokens_total)])
    counter("vllm:generation_tokens", "Number of generation tokens processed.",
            [(base, engine.generation_tokens_total)])
    counter("vllm:request_success", "Count of successfully processed requests.",
            [(f'engine="0",finished_reason="{r}",model_name="{_esc(model_name)}"',
              engine.success[r]) for r in FINISH_REASONS])
    return ("\n".join(lines) + "\n").encode()
