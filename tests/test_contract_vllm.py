"""The vLLM 0.32.0 contract (tests/support/contract.py) holds for the real vLLM CPU server.

The same target-agnostic checks run against the simulator in test_contract_sim.py; here the
target is a real vLLM container of tiny-a from the CPU registry (tests/support/vllm_fixtures.py),
so a check that drifted from real vLLM fails here.
"""

from __future__ import annotations

import json

import httpx
import pytest

from support.contract import (
    ALL_CHECKS,
    Check,
    check_detokenize,
    check_error_too_many_tokens,
    check_error_unknown_model,
    check_health,
    check_models,
    check_tokenize,
    sse_events,
)
from support.vllm_fixtures import VllmServer

pytestmark = pytest.mark.vllm

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(vllm_tiny_a: VllmServer, check: Check) -> None:
    check(vllm_tiny_a.base_url, vllm_tiny_a.model, vllm_tiny_a.max_model_len)


@pytest.mark.parametrize("alias", ["tiny", "gpt-4o-mini"])
def test_alias_is_answered_under_the_first_served_name(vllm_tiny_a: VllmServer,
                                                       alias: str) -> None:
    """A request may name any served name (the registry's aliases), but real vLLM answers with
    its first served name (vLLM's `model_name()` is `base_model_paths[0].name`): a client
    asking for `gpt-4o-mini` reads `"model": "tiny-a"`. /v1/models lists every name."""
    first = vllm_tiny_a.served_names[0]
    assert alias in vllm_tiny_a.served_names[1:] and first == vllm_tiny_a.model
    chat = {"model": alias, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with httpx.Client(base_url=vllm_tiny_a.base_url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.json()["model"] == first, r.text
        with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            assert s.status_code == 200
            chunks = [json.loads(p) for p in sse_events(s)]
        assert chunks and {ch["model"] for ch in chunks} == {first}, chunks
        r = c.post("/v1/completions", json={"model": alias, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == first, r.text
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert list(listed) == list(vllm_tiny_a.served_names)
    assert listed[alias]["max_model_len"] == vllm_tiny_a.max_model_len
    for check in (check_health, check_models, check_tokenize, check_detokenize,
                  check_error_unknown_model):  # the checks that do not read `model` back
        check(vllm_tiny_a.base_url, alias, vllm_tiny_a.max_model_len)


def test_contract_catches_a_difference(vllm_tiny_a: VllmServer) -> None:
    """The checks can fail against real vLLM too: a wrong context length or name is caught."""
    url, name, max_len = vllm_tiny_a.base_url, vllm_tiny_a.model, vllm_tiny_a.max_model_len
    with pytest.raises(AssertionError):
        check_models(url, name, max_len + 1)
    with pytest.raises(AssertionError):
        check_models(url, "not-served", max_len)
    with pytest.raises(AssertionError):
        check_error_too_many_tokens(url, name, max_len * 2)
