"""vllm_sim.validate, vllm_sim.errors and vllm_sim.tokenizer: vLLM's rejections, exactly."""

from __future__ import annotations

import json

import pytest

from vllm_sim.errors import SimHTTPError
from vllm_sim.tokenizer import Tokenizer, count_chat_tokens
from vllm_sim.validate import check_sampling, parse_json, validate_chat, validate_completion

pytestmark = pytest.mark.unit


def _error(exc: pytest.ExceptionInfo[SimHTTPError]) -> dict[str, object]:
    return json.loads(exc.value.body())["error"]


def test_bad_json_like_fastapi() -> None:
    with pytest.raises(SimHTTPError) as exc:
        parse_json(b'{"model":"tiny","messages":[')
    assert exc.value.body() == (
        b'{"error":{"message":"1 validation error:\\n  {\'type\': \'json_invalid\', \'loc\': '
        b'\'body.28\', \'msg\': \'JSON decode error\', \'input\': \'<dict of 0 items>\', '
        b'\'ctx\': {\'error\': \'Expecting value\'}}","type":"Bad Request","param":"body.28",'
        b'"code":400}}')


def test_missing_and_mistyped_fields() -> None:
    with pytest.raises(SimHTTPError) as exc:
        validate_chat({"model": "tiny"})
    assert _error(exc)["param"] == "body.messages"
    with pytest.raises(SimHTTPError) as exc:
        validate_chat({"messages": [], "max_tokens": "many", "stream": "maybe"})
    err = _error(exc)
    assert str(err["message"]).startswith("2 validation errors:\n  {'type': 'int_type'")
    assert err["param"] == "body.max_tokens" and err["type"] == "Bad Request"
    with pytest.raises(SimHTTPError):
        validate_chat([1, 2])
    with pytest.raises(SimHTTPError):
        validate_completion({"prompt": {"a": 1}})


def test_semantic_checks_with_vllm_messages() -> None:
    sampling, _ = validate_chat({"messages": [{"role": "user", "content": "x"}],
                                 "temperature": -3})
    with pytest.raises(SimHTTPError) as exc:
        check_sampling(sampling, 10, 512, 16)
    assert _error(exc) == {
        "message": "temperature must be non-negative, got -3.0. "
                   "(parameter=temperature, value=-3.0)",
        "type": "BadRequestError", "param": "temperature", "code": 400}
    too_many, _ = validate_chat({"messages": [], "max_tokens": 100000})
    with pytest.raises(SimHTTPError) as exc:
        check_sampling(too_many, 10, 512, 16)
    assert _error(exc)["message"] == (
        "max_tokens=100000 cannot be greater than max_model_len=512. Please request fewer "
        "output tokens. (parameter=max_tokens, value=100000)")
    tight, _ = validate_chat({"messages": [], "max_tokens": 500})
    with pytest.raises(SimHTTPError) as exc:
        check_sampling(tight, 20, 512, 16)
    assert _error(exc)["param"] == "input_tokens"


def test_max_tokens_defaults() -> None:
    sampling, _ = validate_chat({"messages": [], "max_completion_tokens": 3, "max_tokens": 9})
    assert check_sampling(sampling, 10, 512, 16) == 3
    sampling, _ = validate_chat({"messages": []})
    assert check_sampling(sampling, 10, 512, 16) == 16
    assert check_sampling(sampling, 500, 512, 16) == 12  # capped by the context


def test_completion_prompts() -> None:
    assert validate_completion({"prompt": "a"})[1] == ["a"]
    assert validate_completion({"prompt": ["a", "b"]})[1] == ["a", "b"]
    assert validate_completion({"prompt": [1, 2]})[1] == [[1, 2]]
    assert validate_completion({"prompt": [[1], [2, 3]]})[1] == [[1], [2, 3]]


def test_tokenizer_counts_and_round_trips() -> None:
    tok = Tokenizer()
    ids = tok.encode("Hello world, again!")
    assert len(ids) == tok.count("Hello world, again!") == 5
    assert tok.decode(ids) == "Hello world, again!"
    assert tok.decode([1, 2]) == "<s></s>"
    assert count_chat_tokens([{"role": "user", "content": "Hello"}]) == 10  # as the capture
    assert count_chat_tokens([{"role": "user", "content": [{"type": "text", "text": "a b"}]}]) == 11
