"""Response bodies byte-for-byte in vLLM 0.32.0's shape (field order, nulls, SSE framing).

Every generated token of a request has the same text, so a stream's body parts are built once
per request (role chunk, token chunk, last chunk, usage chunk) and then written as they are:
no JSON encoding per token.
"""

from __future__ import annotations

import json
import random

DONE = b"data: [DONE]\n\n"


def dumps(value: object) -> str:
    """Compact JSON with raw UTF-8, as pydantic writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def new_id(prefix: str) -> str:
    """`chatcmpl-<16 hex>` / `cmpl-<16 hex>` like vLLM's request ids."""
    return f"{prefix}-{random.getrandbits(64):016x}"


def _usage(prompt: int, completion: int) -> str:
    return (f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
            f'"completion_tokens":{completion}}}')


def _usage_full(prompt: int, completion: int) -> str:
    return (f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
            f'"completion_tokens":{completion},"prompt_tokens_details":null,'
            '"completion_tokens_details":null}')


class ChatRender:
    """Bodies of one chat completion (`choices` = number of choices, all alike)."""

    def __init__(self, rid: str, created: int, model: str, token: str, fingerprint: str,
                 choices: int) -> None:
        self.rid = rid
        self.choices = choices
        self.fingerprint = fingerprint
        self._head = (f'{{"id":"{rid}","object":"chat.completion.chunk","created":{created},'
                      f'"model":{dumps(model)},"choices":[')
        self._created = created
        self._model = model
        self.token = token
        tok = dumps(token)
        self.role_chunks = [
            (f'data: {self._head}{{"index":{i},"delta":{{"role":"assistant","content":""}},'
             '"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,'
             '"prompt_text":null}\n\n').encode() for i in range(choices)]
        self.token_chunks = [
            (f'data: {self._head}{{"index":{i},"delta":{{"content":{tok}}},"logprobs":null,'
             '"finish_reason":null,"token_ids":null}]}\n\n').encode() for i in range(choices)]

    def last_chunk(self, index: int, finish_reason: str, content: str | None,
                   fingerprint: bool) -> bytes:
        """The chunk carrying `finish_reason` (and the last token's text)."""
        text = dumps(content if content is not None else "")
        tail = f',"system_fingerprint":"{self.fingerprint}"' if fingerprint else ""
        return (f'data: {self._head}{{"index":{index},"delta":{{"content":{text}}},'
                f'"logprobs":null,"finish_reason":{dumps(finish_reason)},"stop_reason":null,'
                f'"token_ids":null}}]{tail}}}\n\n').encode()

    def usage_chunk(self, prompt: int, completion: int) -> bytes:
        return (f'data: {self._head}],"usage":{_usage(prompt, completion)},'
                f'"system_fingerprint":"{self.fingerprint}"}}\n\n').encode()

    def response(self, completions: list[int], finish_reason: str, prompt: int) -> bytes:
        """The non-streamed answer: one choice per entry of `completions` (token counts)."""
        choices = ",".join(
            f'{{"index":{i},"message":{{"role":"assistant","content":{dumps(self.token * n)},'
            '"refusal":null,"annotations":null,"audio":null,"function_call":null,'
            f'"reasoning":null}},"logprobs":null,"finish_reason":{dumps(finish_reason)},'
            '"stop_reason":null,"token_ids":null,"routed_experts":null}'
            for i, n in enumerate(completions))
        return (f'{{"id":"{self.rid}","object":"chat.completion","created":{self._created},'
                f'"model":{dumps(self._model)},"choices":[{choices}],"service_tier":null,'
                f'"system_fingerprint":"{self.fingerprint}",'
                f'"usage":{_usage_full(prompt, sum(completions))},"prompt_logprobs":null,'
                '"prompt_token_ids":null,"prompt_text":null,"kv_transfer_params":null,'
                '"ec_transfer_params":null,"metrics":null}').encode()


class CompletionRender:
    """Bodies of one text completion (one choice per prompt and `n`)."""

    def __init__(self, rid: str, created: int, model: str, token: str, fingerprint: str,
                 choices: int) -> None:
        self.rid = rid
        self.choices = choices
        self.fingerprint = fingerprint
        self.token = token
        self._created = created
        self._model = model
        self._head = (f'{{"id":"{rid}","object":"text_completion","created":{created},'
                      f'"model":{dumps(model)},"choices":[')
        tok = dumps(token)
        self.role_chunks: list[bytes] = []
        self.token_chunks = [
            (f'data: {self._head}{{"index":{i},"text":{tok},"logprobs":null,'
             '"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
             '"token_ids":null}]}\n\n').encode() for i in range(choices)]

    def last_chunk(self, index: int, finish_reason: str, content: str | None,
                   fingerprint: bool) -> bytes:
        text = dumps(content if content is not None else "")
        tail = f',"system_fingerprint":"{self.fingerprint}"' if fingerprint else ""
        return (f'data: {self._head}{{"index":{index},"text":{text},"logprobs":null,'
                f'"finish_reason":{dumps(finish_reason)},"stop_reason":null,'
                f'"prompt_token_ids":null,"token_ids":null}}]{tail}}}\n\n').encode()

    def usage_chunk(self, prompt: int, completion: int) -> bytes:
        return (f'data: {self._head}],"usage":{_usage(prompt, completion)},'
                f'"system_fingerprint":"{self.fingerprint}"}}\n\n').encode()

    def response(self, completions: list[int], finish_reason: str, prompt: int) -> bytes:
        choices = ",".join(
            f'{{"index":{i},"text":{dumps(self.token * n)},"logprobs":null,'
            f'"finish_reason":{dumps(finish_reason)},"stop_reason":null,"token_ids":null,'
            '"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null}'
            for i, n in enumerate(completions))
        return (f'{{"id":"{self.rid}","object":"text_completion","created":{self._created},'
                f'"model":{dumps(self._model)},"choices":[{choices}],"service_tier":null,'
                f'"system_fingerprint":"{self.fingerprint}",'
                f'"usage":{_usage_full(prompt, sum(completions))},"kv_transfer_params":null,'
                '"ec_transfer_params":null,"metrics":null}').encode()


def models_body(names: tuple[str, ...], root: str, max_model_len: int, created: int) -> bytes:
    data = [{
        "id": name, "object": "model", "created": created, "owned_by": "vllm", "root": root,
        "parent": None, "max_model_len": max_model_len,
        "permission": [{
            "id": new_id("modelperm"), "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    } for name in names]
    return dumps({"object": "list", "data": data}).encode()
