"""The vLLM 0.32.0 contract (tests/support/contract.py) holds for the simulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.contract import ALL_CHECKS, Check
from support.sim_fixtures import SimServer, start_sim

pytestmark = pytest.mark.gateway

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def contract_sim() -> Iterator[SimServer]:
    server = start_sim(served_names=("tiny", "tiny-alias"), max_model_len=MAX_MODEL_LEN)
    yield server
    server.stop()


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(contract_sim: SimServer, check: Check) -> None:
    check(contract_sim.base_url, "tiny", MAX_MODEL_LEN)


def test_contract_alias(contract_sim: SimServer) -> None:
    """A second served name answers under its own name."""
    for check in ALL_CHECKS:
        check(contract_sim.base_url, "tiny-alias", MAX_MODEL_LEN)


def test_contract_catches_a_difference(contract_sim: SimServer) -> None:
    """The checks are able to fail: a wrong context length or model name is reported."""
    from support.contract import check_error_too_many_tokens, check_models

    with pytest.raises(AssertionError):
        check_models(contract_sim.base_url, "tiny", MAX_MODEL_LEN + 1)
    with pytest.raises(AssertionError):
        check_models(contract_sim.base_url, "not-served", MAX_MODEL_LEN)
    with pytest.raises(AssertionError):
        check_error_too_many_tokens(contract_sim.base_url, "tiny", MAX_MODEL_LEN * 2)
