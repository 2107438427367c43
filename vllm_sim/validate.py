"""Parse and validate request bodies the way vLLM 0.32.0 rejects them.

Only the checks a client can observe are here: JSON syntax, required fields, field types of
the common parameters, and the semantic checks with vLLM's messages (max_tokens against the
context length, temperature, top_p, n). Everything else in a body is accepted and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_sim.errors import SimHTTPError, bad_request, describe_input, validation_error

# field -> (pydantic error type, message, coercion returning the value or raising ValueError)


def _as_int(v: Any) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        return int(v.strip())
    raise ValueError


def _as_float(v: Any) -> float:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return float(v.strip())
    raise ValueError


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return v.lower() in ("true", "1", "yes", "on")
    raise ValueError


def _as_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError


def _as_dict(v: Any) -> dict[str, Any]:
    if isinstance(v, dict):
        return v
    raise ValueError


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, list):
        return v
    raise ValueError


_KINDS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "int": ("int_type", "Input should be a valid integer", _as_int),
    "float": ("float_type", "Input should be a valid number", _as_float),
    "bool": ("bool_type", "Input should be a valid boolean", _as_bool),
    "str": ("string_type", "Input should be a valid string", _as_str),
    "dict": ("dict_type", "Input should be a valid dictionary", _as_dict),
    "list": ("list_type", "Input should be a valid list", _as_list),
}

_COMMON_FIELDS = {
    "model": "str",
    "max_tokens": "int",
    "temperature": "float",
    "top_p": "float",
    "n": "int",
    "stream": "bool",
    "stream_options": "dict",
    "ignore_eos": "bool",
}
_CHAT_FIELDS = {**_COMMON_FIELDS, "messages": "list", "max_completion_tokens": "int"}
_COMPLETION_FIELDS = dict(_COMMON_FIELDS)


def parse_json(raw: bytes) -> Any:
    """The JSON body, or the 400 FastAPI gives for a body that is not JSON."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        pos, msg = exc.pos, exc.msg
    except UnicodeDecodeError as exc:
        pos, msg = exc.start, "Invalid UTF-8"
    raise validation_error([{
        "type": "json_invalid", "loc": f"body.{pos}", "msg": "JSON decode error",
        "input": "<dict of 0 items>", "ctx": {"error": msg},
    }])


def _check_fields(body: Any, fields: dict[str, str], required: tuple[str, ...]) -> dict[str, Any]:
    """Coerced values of the typed fields; raises the pydantic-style 400 on the first errors."""
    if not isinstance(body, dict):
        raise validation_error([{
            "type": "model_attributes_type", "loc": "body",
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": describe_input(body),
        }])
    errors: list[dict[str, Any]] = []
    for name in required:
        if name not in body:
            errors.append({"type": "missing", "loc": f"body.{name}", "msg": "Field required",
                           "input": describe_input(body)})
    values: dict[str, Any] = {}
    for name, kind in fields.items():
        raw = body.get(name)
        if raw is None:
            values[name] = None
            continue
        err_type, msg, coerce = _KINDS[kind]
        try:
            values[name] = coerce(raw)
        except (ValueError, TypeError):
            errors.append({"type": err_type, "loc": f"body.{name}", "msg": msg,
                           "input": describe_input(raw)})
    if errors:
        raise validation_error(errors)
    return values


@dataclass(frozen=True)
class Sampling:
    """The parameters of a generation request the simulator uses."""

    model: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    n: int
    temperature: float | None
    top_p: float | None


def _sampling(values: dict[str, Any], max_tokens: int | None) -> Sampling:
    opts = values.get("stream_options") or {}
    return Sampling(
        model=values["model"],
        max_tokens=max_tokens,
        stream=bool(values["stream"]),
        include_usage=bool(opts.get("include_usage")),
        n=values["n"] if values["n"] is not None else 1,
        temperature=values["temperature"],
        top_p=values["top_p"],
    )


def validate_chat(body: Any) -> tuple[Sampling, list[Any]]:
    """(sampling parameters, messages) of a chat request, or the 400 vLLM gives."""
    values = _check_fields(body, _CHAT_FIELDS, ("messages",))
    messages: list[Any] = values["messages"]
    errors = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            errors.append({"type": "missing" if isinstance(m, dict) else "model_attributes_type",
                           "loc": f"body.messages.{i}", "msg": "Invalid message",
                           "input": describe_input(m)})
    if errors:
        raise validation_error(errors)
    max_tokens = values["max_completion_tokens"]
    if max_tokens is None:
        max_tokens = values["max_tokens"]
    return _sampling(values, max_tokens), messages


def validate_completion(body: Any) -> tuple[Sampling, list[str | list[int]]]:
    """(sampling parameters, prompts) of a completions request, or the 400 vLLM gives."""
    values = _check_fields(body, _COMPLETION_FIELDS, ("prompt",))
    prompts = _prompts(body["prompt"])
    if prompts is None:
        raise validation_error([{"type": "value_error", "loc": "body.prompt",
                                 "msg": "Input should be a string, a list of strings or token ids",
                                 "input": describe_input(body["prompt"])}])
    if not prompts:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.")
    return _sampling(values, values["max_tokens"]), prompts


def _prompts(raw: Any) -> list[str | list[int]] | None:
    """A completions prompt as a batch: str | list[str] | list[int] | list[list[int]]."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        if all(isinstance(x, str) for x in raw):
            return list(raw)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return [list(raw)] if raw else []
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            return [list(x) for x in raw]
    return None


def check_sampling(s: Sampling, prompt_tokens: int, max_model_len: int,
                   default_max_tokens: int) -> int:
    """The number of tokens to generate, or vLLM's BadRequestError for the request."""
    if s.max_tokens is not None:
        if s.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {s.max_tokens}.",
                              "max_tokens", s.max_tokens)
        if s.max_tokens > max_model_len:
            raise bad_request(
                f"max_tokens={s.max_tokens} cannot be greater than max_model_len={max_model_len}."
                " Please request fewer output tokens.", "max_tokens", s.max_tokens)
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_tokens} input tokens. Please reduce the length of the input "
            "messages.", "input_tokens", prompt_tokens)
    if s.max_tokens is not None and prompt_tokens + s.max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {s.max_tokens} output tokens and your prompt contains at least "
            f"{prompt_tokens} input tokens, for a total of at least "
            f"{prompt_tokens + s.max_tokens} tokens. Please reduce the length of the input "
            "prompt or the number of requested output tokens.", "input_tokens", prompt_tokens)
    if s.temperature is not None and s.temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {s.temperature}.",
                          "temperature", s.temperature)
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {s.top_p}.", "top_p", s.top_p)
    if s.n < 1:
        raise bad_request(f"n must be at least 1, got {s.n}.", "n", s.n)
    if s.max_tokens is not None:
        return s.max_tokens
    return max(1, min(default_max_tokens, max_model_len - prompt_tokens))


def model_field(body: Any) -> str | None:
    """The `model` of a body for the endpoints without typed validation (tokenize, ...)."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return body["model"]
    return None


__all__ = ["Sampling", "SimHTTPError", "check_sampling", "model_field", "parse_json",
           "validate_chat", "validate_completion"]
