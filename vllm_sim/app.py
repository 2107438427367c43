"""The simulator's ASGI application: vLLM 0.32.0's OpenAI server as seen from outside.

A raw ASGI app (no framework on the hot path). It stays one module of about 450 lines on
purpose: it is vLLM's route table, one handler per endpoint, and reads as the contract the
simulator keeps (tests/support/contract.py); the engine and rendering live beside it. Routes:

- vLLM's: `GET /health`, `GET /ping`, `GET /version`, `GET /load`, `GET /metrics`,
  `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`,
  `POST /v1/embeddings`, `POST /tokenize`, `POST /detokenize`; and with `--enable-sleep-mode`
  or `VLLM_SERVER_DEV_MODE=1`: `POST /sleep?level=N&mode=abort|wait|keep`,
  `POST /wake_up[?tags=..]`, `GET /is_sleeping` (404 otherwise).
- the simulator's own, for tests: `GET /sim/requests` (recent requests with their outcome
  `completed`/`aborted`, abort reason and token counts; the running/waiting counts) and
  `POST /sim/health?status=503` (make `/health` answer that status; 200 restores it).

Unknown paths answer 404 `{"detail":"Not Found"}`, a known path with another method 405.
With `--api-key` (or `VLLM_API_KEY`) every `/v1` path needs `Authorization: Bearer <key>`
(401 `{"error":"Unauthorized"}`), as in vLLM. `/health` stays 200 while the engine sleeps,
as in vLLM.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from vllm_sim.config import VLLM_VERSION, SimConfig
from vllm_sim.engine import Engine, SimRequest
from vllm_sim.errors import SimHTTPError, bad_request, model_not_found, validation_error
from vllm_sim.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vllm_sim.metrics import render_metrics
from vllm_sim.render import DONE, ChatRender, CompletionRender, dumps, models_body, new_id
from vllm_sim.tokenizer import (
    CHAT_TOKENS_PER_MESSAGE, CHAT_TOKENS_PER_PROMPT, Tokenizer, count_chat_tokens, first_word,
    message_text,
)
from vllm_sim.validate import (
    Sampling, check_sampling, model_field, parse_json, validate_chat, validate_completion,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"
_VARY = (b"vary", b"Origin")
_SSE_START: Message = {
    "type": "http.response.start", "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), _VARY],
}
_NOT_FOUND = b'{"detail":"Not Found"}'
_METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
_DEFAULT_WORD = "hello"


def _fingerprint(config: SimConfig) -> str:
    digest = hashlib.sha256(f"{config.model}|{config.max_model_len}".encode()).hexdigest()
    return f"vllm-{VLLM_VERSION}-{digest[:8]}"


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def respond(send: Send, status: int, body: bytes, content_type: bytes | None = JSON,
                  extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    headers.append(_VARY)
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SimApp:
    """One simulated vLLM server. `engine` is exposed for in-process tests."""

    def __init__(self, config: SimConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.knobs = config.knobs
        self.engine = engine if engine is not None else Engine(config.max_num_seqs)
        self.tokenizer = Tokenizer()
        self.fingerprint = _fingerprint(config)
        self.health_status = 200
        self._names = config.served_model_names
        self._api_key = config.api_key.encode() if config.api_key else None
        self._routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self.health},
            "/ping": {"GET": self.health, "POST": self.health},
            "/version": {"GET": self.version},
            "/load": {"GET": self.load},
            "/metrics": {"GET": self.metrics},
            "/v1/models": {"GET": self.models},
            "/v1/chat/completions": {"POST": self.chat},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/tokenize": {"POST": self.tokenize},
            "/detokenize": {"POST": self.detokenize},
            "/sim/requests": {"GET": self.sim_requests},
            "/sim/health": {"POST": self.sim_health},
        }
        if config.sleep_endpoints:
            self._routes["/sleep"] = {"POST": self.sleep}
            self._routes["/wake_up"] = {"POST": self.wake_up}
            self._routes["/is_sleeping"] = {"GET": self.is_sleeping}

    # -- ASGI entry ------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self._routes.get(scope["path"])
            if route is None:
                await respond(send, 404, _NOT_FOUND)
                return
            handler = route.get(scope["method"])
            if handler is None:
                allow = ", ".join(route).encode()
                await respond(send, 405, _METHOD_NOT_ALLOWED, extra=((b"allow", allow),))
                return
            if self._api_key is not None and scope["path"].startswith("/v1"):
                if not self._authorized(scope):
                    await respond(send, 401, _UNAUTHORIZED)
                    return
            try:
                await handler(scope, receive, send)
            except SimHTTPError as exc:
                await respond(send, exc.status, exc.body())
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.engine.abort_all("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return value == b"Bearer " + self._api_key  # type: ignore[operator]
        return False

    def _model(self, requested: str | None) -> str:
        """The model name to answer with: the requested alias, or the first served name."""
        if requested is None:
            return self._names[0]
        if requested not in self._names:
            raise model_not_found(requested, self._names)
        return requested

    def _token(self, prompt_text: str) -> str:
        if self.knobs.output_token is not None:
            return self.knobs.output_token
        return " " + (first_word(prompt_text) or _DEFAULT_WORD)

    # -- plain endpoints ---------------------------------------------------------------------
    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, self.health_status, b"", None)

    async def version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, b'{"version":"%s"}' % VLLM_VERSION.encode())

    async def load(self, scope: Scope, receive: Receive, send: Send) -> None:
        load = self.engine.running + self.engine.waiting
        await respond(send, 200, b'{"server_load":%d}' % load)

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = render_metrics(self.engine, self.config.model_label)
        await respond(send, 200, body, METRICS_CONTENT_TYPE)

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = models_body(self._names, self.config.model, self.config.max_model_len,
                           int(time.time()))
        await respond(send, 200, body)

    # -- generation ------------------------------------------------------------------------
    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_json(await _read_body(receive))
        sampling, messages = validate_chat(body)
        model = self._model(sampling.model)
        prompt_tokens = count_chat_tokens(messages)
        max_tokens = check_sampling(sampling, prompt_tokens, self.config.max_model_len,
                                    self.knobs.max_tokens_default)
        last = messages[-1].get("content") if messages else ""
        render = ChatRender(new_id("chatcmpl"), int(time.time()), model,
                            self._token(message_text(last)), self.fingerprint, sampling.n)
        await self._generate(send, receive, render, sampling, "chat", model, prompt_tokens,
                             max_tokens)

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_json(await _read_body(receive))
        sampling, prompts = validate_completion(body)
        model = self._model(sampling.model)
        counts = [len(p) if isinstance(p, list) else Tokenizer.count(p) for p in prompts]
        max_tokens = max(check_sampling(sampling, c, self.config.max_model_len,
                                        self.knobs.max_tokens_default) for c in counts)
        first = prompts[0]
        render = CompletionRender(new_id("cmpl"), int(time.time()), model,
                                  self._token(first if isinstance(first, str) else ""),
                                  self.fingerprint, sampling.n * len(prompts))
        await self._generate(send, receive, render, sampling, "completions", model,
                             sum(counts), max_tokens)

    async def _generate(self, send: Send, receive: Receive, render: ChatRender | CompletionRender,
                        sampling: Sampling, endpoint: str, model: str, prompt_tokens: int,
                        max_tokens: int) -> None:
        req = SimRequest(render.rid, endpoint, model, sampling.stream, prompt_tokens, max_tokens,
                         receive)
        if sampling.stream:
            await self._stream(send, req, render, sampling.include_usage)
        else:
            await self._unary(send, req, render)

    async def _stream(self, send: Send, req: SimRequest, render: ChatRender | CompletionRender,
                      include_usage: bool) -> None:
        engine = self.engine
        ttft, itl = self.knobs.ttft_s, self.knobs.itl_s
        n, choices = req.max_tokens, render.choices
        await send(_SSE_START)
        finished = False
        try:
            ok = await engine.admit(req)
            if ok and ttft > 0:
                ok = await req.sleep(ttft)
            if ok and engine.holding:
                ok = await engine.hold_point(req)
            if ok:
                for chunk in render.role_chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                token_chunks = render.token_chunks
                for t in range(n):
                    if t:
                        if itl > 0 and not await req.sleep(itl):
                            break
                        if engine.holding and not await engine.hold_point(req):
                            break
                    if req.aborted:
                        break
                    req.completion_tokens += choices
                    if t < n - 1:
                        for chunk in token_chunks:
                            await send({"type": "http.response.body", "body": chunk,
                                        "more_body": True})
                    else:
                        engine.finish(req, "length")
                        finished = True
                        for c in range(choices):
                            chunk = render.last_chunk(c, "length", render.token,
                                                      not include_usage and c == choices - 1)
                            await send({"type": "http.response.body", "body": chunk,
                                        "more_body": True})
            if not finished:
                engine.finish(req, "length")
                finished = True
            if req.aborted:
                if req.abort_reason == "client_disconnect":
                    return
                for c in range(choices):  # aborted by the engine: vLLM ends the stream
                    chunk = render.last_chunk(c, "abort", "", not include_usage and c == choices - 1)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if include_usage:
                await send({"type": "http.response.body", "more_body": True,
                            "body": render.usage_chunk(req.prompt_tokens, req.completion_tokens)})
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
        finally:
            if not finished:
                engine.finish(req, "length")

    async def _unary(self, send: Send, req: SimRequest,
                     render: ChatRender | CompletionRender) -> None:
        engine = self.engine
        ttft, itl = self.knobs.ttft_s, self.knobs.itl_s
        n, choices = req.max_tokens, render.choices
        try:
            ok = await engine.admit(req)
            total = ttft + (n - 1) * itl
            if ok and total > 0:
                start = time.monotonic()
                ok = await req.sleep(total)
                if not ok:
                    req.completion_tokens = choices * _tokens_after(
                        time.monotonic() - start, ttft, itl, n)
            if ok and engine.holding:
                ok = await engine.hold_point(req)
            if ok:
                req.completion_tokens = n * choices
        finally:
            engine.finish(req, "length")
        if req.aborted:
            if req.abort_reason == "client_disconnect":
                return
            body = render.response([req.completion_tokens // choices] * choices, "abort",
                                   req.prompt_tokens)
        else:
            body = render.response([n] * choices, "length", req.prompt_tokens)
        await respond(send, 200, body)

    # -- embeddings and tokenizer ----------------------------------------------------------
    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_json(await _read_body(receive))
        if not isinstance(body, dict) or "input" not in body:
            raise validation_error([{"type": "missing", "loc": "body.input",
                                     "msg": "Field required", "input": "<dict>"}])
        model = self._model(model_field(body))
        raw = body["input"]
        texts: list[str]
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            texts = raw
        elif isinstance(raw, list) and all(isinstance(x, int) for x in raw):
            texts = [" ".join(map(str, raw))]
        elif isinstance(raw, list) and all(isinstance(x, list) for x in raw):
            texts = [" ".join(map(str, x)) for x in raw]
        else:
            raise bad_request("input must be a string, a list of strings or token ids.")
        prompt_tokens = sum(Tokenizer.count(t) for t in texts)
        req = SimRequest(new_id("embd"), "embeddings", model, False, prompt_tokens, 0, receive)
        try:
            if not await self.engine.admit(req):
                return
        finally:
            self.engine.finish(req, None)
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = _embedding(text, self.knobs.embedding_dim)
            emb: Any = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                        if b64 else vec)
            data.append({"index": i, "object": "embedding", "embedding": emb})
        out = {"id": req.request_id, "object": "list", "created": int(time.time()),
               "model": model, "data": data,
               "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                         "completion_tokens": 0, "prompt_tokens_details": None}}
        await respond(send, 200, dumps(out).encode())

    async def tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_json(await _read_body(receive))
        if not isinstance(body, dict) or ("prompt" not in body and "messages" not in body):
            raise validation_error([{"type": "missing", "loc": "body.prompt",
                                     "msg": "Field required", "input": "<dict>"}])
        self._model(model_field(body))
        tok = self.tokenizer
        if "messages" in body:
            messages = body["messages"] if isinstance(body["messages"], list) else []
            ids: list[int] = []
            for m in messages:
                text = message_text(m.get("content")) if isinstance(m, dict) else ""
                ids += [1] + [3] * (CHAT_TOKENS_PER_MESSAGE - 1) + tok.encode(text)
            ids += [1] + [3] * (CHAT_TOKENS_PER_PROMPT - 1)
            strs = None
        else:
            prompt = body["prompt"] if isinstance(body["prompt"], str) else ""
            ids = tok.encode(prompt)
            strs = tok.pieces(prompt) if body.get("return_token_strs") else None
        out = {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids,
               "token_strs": strs}
        await respond(send, 200, dumps(out).encode())

    async def detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = parse_json(await _read_body(receive))
        if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
            raise validation_error([{"type": "missing", "loc": "body.tokens",
                                     "msg": "Field required", "input": "<dict>"}])
        self._model(model_field(body))
        ids = [t for t in body["tokens"] if isinstance(t, int)]
        await respond(send, 200, dumps({"prompt": self.tokenizer.decode(ids)}).encode())

    # -- sleep mode --------------------------------------------------------------------------
    async def sleep(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope["query_string"].decode())
        try:
            level = int(query.get("level", ["1"])[0])
        except ValueError:
            raise bad_request("level must be an integer.", "level",
                              query.get("level", [""])[0]) from None
        mode = query.get("mode", ["abort"])[0]
        if mode not in ("abort", "wait", "keep"):
            raise bad_request(f"Invalid pause mode: {mode}", "mode", mode)
        await self.engine.sleep(level, mode)
        if self.knobs.sleep_s > 0:
            await asyncio.sleep(self.knobs.sleep_s)
        await respond(send, 200, dumps({"status": "sleeping", "level": level}).encode())

    async def wake_up(self, scope: Scope, receive: Receive, send: Send) -> None:
        tags = parse_qs(scope["query_string"].decode()).get("tags") or None
        if self.knobs.wake_s > 0 and self.engine.is_sleeping:
            await asyncio.sleep(self.knobs.wake_s)
        self.engine.wake_up(tags)
        await respond(send, 200, dumps({"status": "awake", "tags": tags}).encode())

    async def is_sleeping(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b'{"is_sleeping":true}' if self.engine.is_sleeping else b'{"is_sleeping":false}'
        await respond(send, 200, body)

    # -- simulator-only ----------------------------------------------------------------------
    async def sim_requests(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.engine
        out = {"running": engine.running, "waiting": engine.waiting,
               "sleeping": engine.is_sleeping,
               "requests": [r.as_dict() for r in engine.recent]}
        await respond(send, 200, dumps(out).encode())

    async def sim_health(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope["query_string"].decode())
        try:
            status = int(query.get("status", ["200"])[0])
        except ValueError:
            raise bad_request("status must be an integer.", "status", query["status"][0]) from None
        if not 200 <= status <= 599:
            raise bad_request("status must be an HTTP status.", "status", status)
        self.health_status = status
        await respond(send, 200, dumps({"health_status": status}).encode())


def _tokens_after(elapsed: float, ttft: float, itl: float, n: int) -> int:
    """Tokens a request had generated `elapsed` seconds after admission."""
    if elapsed < ttft:
        return 0
    if itl <= 0:
        return n
    return min(n, 1 + int((elapsed - ttft) / itl))


def _embedding(text: str, dim: int) -> list[float]:
    rng = random.Random(text)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
