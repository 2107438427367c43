"""A simulator of vLLM 0.32.0's OpenAI-compatible server, as seen from outside.

Run it like vLLM: `python -m vllm_sim --model M --served-model-name a b --port 8000 ...`
(console script `vllm-sim`). Only starlette/uvicorn and the standard library are needed; the
server itself is a raw ASGI app under uvicorn (uvloop/httptools when installed).

Simulation knobs are environment variables (the flags stay vLLM's):

- `VLLM_SIM_LOAD_SECONDS` (0): "loading" time; the port is not bound before it has passed.
- `VLLM_SIM_TTFT_MS` (0): time to first token; `VLLM_SIM_ITL_MS` (0): inter-token delay.
- `VLLM_SIM_FAIL_AT_START` (unset): after the load delay, print an engine error, exit 1.
- `VLLM_SIM_MAX_TOKENS_DEFAULT` (16): tokens generated when `max_tokens` is not given.
- `VLLM_SIM_OUTPUT_TOKEN` (unset): the token text repeated in outputs (default " <first word
  of the prompt>").
- `VLLM_SIM_SLEEP_MS` / `VLLM_SIM_WAKE_MS` (0): how long `/sleep` and `/wake_up` take.
- `VLLM_SIM_EMBEDDING_DIM` (32), `VLLM_SIM_ACCESS_LOG` (off).
- vLLM's own `VLLM_SERVER_DEV_MODE=1` (or `--enable-sleep-mode`) enables the sleep endpoints,
  `VLLM_API_KEY` (or `--api-key`) guards `/v1`.

Behaviour: every generated token has the same text; a request generates exactly `max_tokens`
tokens and finishes with "length". While asleep, generation requests wait for `/wake_up`
(vLLM's /sleep pauses its scheduler); `/sleep?mode=abort` (default) ends requests in flight with
finish_reason "abort". A client disconnect aborts its request at once (not counted as a
success, as in vLLM). `GET /sim/requests` lists recent requests and their outcome;
`POST /sim/health?status=503` changes what `/health` answers. Details: `vllm_sim.app`,
`vllm_sim.engine`, `vllm_sim.config`.
"""
