"""The registry: parsing, defaults, derived values and every validation error's wording."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.registry import (
    RegistryError,
    load_registry,
    parse_registry,
    registry_path,
    replica_urls,
    service_name,
    upstream_base_url,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[host]
gpus = [{ id = 0, memory_gib = 80 }, { id = 1 }]
cpus = 16

[defaults]
image = "vllm/vllm-openai:v0.32.0"
args = ["--disable-log-requests"]
env = { VLLM_LOGGING_LEVEL = "INFO" }

[models.qwen-7b]
source = "Qwen/Qwen2.5-7B-Instruct"
port = 8001
gpus = [0]
gpu_memory_utilization = 0.45
aliases = ["gpt-4o-mini", "qwen"]
args = ["--enable-prefix-caching"]
env = { EXTRA = "1" }

[models.big]
source = "/models/big"
port = 8002
gpus = [0, 1]
dedicated = true

[models.remote]
url = "http://127.0.0.1:18001/"
served_model_name = "tiny"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(RegistryError) as info:
        parse_registry(text, source="test.toml")
    assert str(info.value).startswith("test.toml: invalid registry")
    return info.value.problems


def test_parses_models_defaults_and_derived_values() -> None:
    reg = parse_registry(GOOD)
    qwen = reg.models["qwen-7b"]
    assert reg.names() == ["qwen-7b", "big", "remote"]
    assert qwen.managed and not reg.models["remote"].managed
    assert qwen.served_names == ("qwen-7b", "gpt-4o-mini", "qwen")
    assert reg.models["remote"].served_names == ("tiny",)
    assert reg.models["remote"].upstream_model == "tiny"
    assert reg.args(qwen) == ("--disable-log-requests", "--enable-prefix-caching")
    assert reg.env(qwen) == {"VLLM_LOGGING_LEVEL": "INFO", "EXTRA": "1"}
    assert reg.gpu_fraction(qwen) == 0.45
    assert reg.gpu_fraction(reg.models["big"]) == 0.9  # the default
    assert reg.models["big"].tensor_parallel_size == 2
    assert reg.image(qwen) == "vllm/vllm-openai:v0.32.0"


def test_aliases_resolve_to_their_model() -> None:
    reg = parse_registry(GOOD)
    assert reg.get("gpt-4o-mini") is reg.models["qwen-7b"]
    assert reg.get("qwen-7b") is reg.models["qwen-7b"]
    assert reg.get("nope") is None


def test_upstream_urls_for_host_and_compose() -> None:
    reg = parse_registry(GOOD)
    assert upstream_base_url(reg, reg.models["qwen-7b"]) == "http://127.0.0.1:8001"
    assert upstream_base_url(reg, reg.models["qwen-7b"], "service") == "http://vllm-qwen-7b:8001"
    assert upstream_base_url(reg, reg.models["remote"], "service") == "http://127.0.0.1:18001"
    assert service_name("qwen-7b") == "vllm-qwen-7b"


def test_shipped_registry_is_valid() -> None:
    reg = load_registry(REPO / "models.toml")
    assert reg.models, "models.toml defines no model"


def test_unknown_key_is_named_with_a_suggestion() -> None:
    found = problems(GOOD.replace("gpu_memory_utilization = 0.45", "gpu_memory_utilisation = 0.45"))
    assert found == ["model 'qwen-7b': unknown field 'gpu_memory_utilisation' (did you mean "
                     "'gpu_memory_utilization'?); remove it or fix the spelling"]


def test_unknown_top_level_table() -> None:
    found = problems(GOOD + "\n[model.x]\nport = 1\n")
    assert any("unknown table 'model' (did you mean 'models'?)" in p for p in found)


def test_fraction_outside_range() -> None:
    found = problems(GOOD.replace("0.45", "1.5"))
    assert found == ["model 'qwen-7b': field 'gpu_memory_utilization': input should be less "
                     "than or equal to 1 (got 1.5)"]
    assert "greater than 0" in problems(GOOD.replace("0.45", "0"))[0]


def test_duplicate_port_names_both_models() -> None:
    found = problems(GOOD.replace("port = 8002", "port = 8001"))
    assert found == ["model 'big': field 'port': port 8001 is already used by model 'qwen-7b'; "
                     "give each model its own port (replicas use port, port+1, ...)"]


def test_alias_clash_with_another_name_or_alias() -> None:
    clash_name = GOOD.replace('aliases = ["gpt-4o-mini", "qwen"]', 'aliases = ["big"]')
    assert any("'big' is already the name of model 'big'" in p for p in problems(clash_name))
    clash_alias = GOOD.replace('served_model_name = "tiny"',
                               'served_model_name = "tiny"\naliases = ["qwen"]')
    assert any("'qwen' is already an alias of model 'qwen-7b'" in p for p in problems(clash_alias))


def test_source_xor_url() -> None:
    both = problems(GOOD.replace('served_model_name = "tiny"', 'source = "x"'))
    assert any("set exactly one of 'source'" in p for p in both)
    neither = problems('[models.a]\nport = 1\n')
    assert any("set exactly one of 'source'" in p for p in neither)


def test_managed_only_fields_on_a_remote_model() -> None:
    found = problems(GOOD.replace('served_model_name = "tiny"', 'port = 9000\ngpus = [0]'))
    assert any("field(s) port, gpus only apply to managed models" in p for p in found)


def test_port_required_and_gpus_declared() -> None:
    assert any("'port' is required" in p for p in problems('[models.a]\nsource = "x"\n'))
    found = problems(GOOD.replace("gpus = [0, 1]", "gpus = [0, 7]"))
    assert any("GPU 7 is not in [host].gpus" in p for p in found)


def test_flags_owned_by_fields_are_refused_in_args() -> None:
    found = problems(GOOD.replace('args = ["--enable-prefix-caching"]', 'args = ["--port=9"]'))
    assert any("--port is set from the registry field port" in p for p in found)


def test_invalid_names_and_duplicates() -> None:
    assert any("invalid name" in p for p in problems('[models."Bad Name"]\nsource="x"\nport=1\n'))
    found = problems(GOOD.replace('["gpt-4o-mini", "qwen"]', '["qwen", "qwen"]'))
    assert any("lists 'qwen' more than once" in p for p in found)


def test_empty_registry_and_bad_toml() -> None:
    assert any("no models defined" in p for p in problems(""))
    assert problems("[models\n")[0].startswith("not valid TOML")


def test_every_problem_is_reported_at_once() -> None:
    text = GOOD.replace("gpu_memory_utilization = 0.45", "gpu_memory_utilisation = 0.45")
    text = text.replace("port = 8002", "port = 70000")
    assert len(problems(text)) == 2


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as info:
        load_registry(tmp_path / "nope.toml")
    assert "file not found" in str(info.value) and "FLEET_REGISTRY" in str(info.value)


def test_registry_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLEET_REGISTRY", raising=False)
    assert registry_path() == Path("models.toml")
    monkeypatch.setenv("FLEET_REGISTRY", str(tmp_path / "env.toml"))
    assert registry_path() == tmp_path / "env.toml"
    assert registry_path("explicit.toml") == Path("explicit.toml")


def test_json_registry(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('{"models": {"a": {"url": "http://127.0.0.1:1"}}}')
    assert load_registry(path).models["a"].url == "http://127.0.0.1:1"


def test_replicas_take_consecutive_ports() -> None:
    reg = parse_registry(GOOD.replace("port = 8001", "port = 8001\nreplicas = 3")
                         .replace("port = 8002", "port = 8004"))
    qwen = reg.models["qwen-7b"]
    assert (qwen.replica_slots, qwen.initial_replicas) == (3, 3)
    assert replica_urls(reg, qwen) == ["http://127.0.0.1:8001", "http://127.0.0.1:8002",
                                       "http://127.0.0.1:8003"]
    assert replica_urls(reg, qwen, "service") == ["http://vllm-qwen-7b:8001",
                                                  "http://vllm-qwen-7b-r1:8002",
                                                  "http://vllm-qwen-7b-r2:8003"]
    clash = problems(GOOD.replace("port = 8001", "port = 8001\nreplicas = 2"))
    assert clash == ["model 'big': field 'port': port 8002 is already used by model 'qwen-7b'; "
                     "give each model its own port (replicas use port, port+1, ...)"]


def test_autoscaling_fields() -> None:
    text = GOOD.replace("port = 8002", "port = 8005").replace(
        "port = 8001", "port = 8001\nmin_replicas = 0\nmax_replicas = 3\ntarget_ongoing_requests = 4")
    qwen = parse_registry(text).models["qwen-7b"]
    assert qwen.autoscaled and (qwen.replica_slots, qwen.initial_replicas) == (3, 1)
    half = problems(GOOD.replace("port = 8001", "port = 8001\nmax_replicas = 3"))
    assert any("needs both 'max_replicas' and 'target_ongoing_requests'" in p for p in half)
    both = problems(text.replace("min_replicas = 0", "replicas = 2"))
    assert any("either 'replicas' (fixed) or 'min_replicas'" in p for p in both)


def test_remote_replicas_as_a_url_list() -> None:
    reg = parse_registry(GOOD.replace('url = "http://127.0.0.1:18001/"',
                                      'url = ["http://127.0.0.1:18001/", "http://127.0.0.1:18002"]'))
    assert replica_urls(reg, reg.models["remote"]) == ["http://127.0.0.1:18001",
                                                       "http://127.0.0.1:18002"]
    assert any("more than once" in p for p in problems(GOOD.replace(
        'url = "http://127.0.0.1:18001/"', 'url = ["http://a:1", "http://a:1"]')))
    assert any("replicas" in p for p in problems(GOOD.replace(
        'served_model_name = "tiny"', 'served_model_name = "tiny"\nreplicas = 2')))


def test_host_overrides_are_validated_like_the_file() -> None:
    reg = parse_registry(GOOD)
    one = reg.with_host(cpus=1, gpus=[0, 1])
    assert one.host.cpus == 1 and [g.id for g in one.host.gpus] == [0, 1]
    assert one.models == reg.models and reg.host.cpus == 16
    with pytest.raises(RegistryError) as info:
        reg.with_host(gpus=[0])  # model 'big' uses GPU 1
    assert "GPU 1 is not in [host].gpus" in str(info.value)
    with pytest.raises(RegistryError):
        reg.with_host(cpus=0)


def test_registry_from_env_by_precedence(tmp_path: Path) -> None:
    from fleet.registry import load_registry_from_env

    file = tmp_path / "m.toml"
    file.write_text('[models.from-file]\nurl = "http://127.0.0.1:9"\n')
    flag = tmp_path / "flag.toml"
    flag.write_text('[models.from-flag]\nurl = "http://127.0.0.1:9"\n')
    as_json = '{"models": {"from-json": {"url": "http://127.0.0.1:9"}}}'
    env = {"FLEET_REGISTRY_JSON": as_json, "FLEET_REGISTRY": str(file), "MODEL_ID": "Org/Tiny-1B"}
    assert list(load_registry_from_env(flag, env).models) == ["from-flag"]
    reg = load_registry_from_env(None, env)
    assert list(reg.models) == ["from-json"] and reg.source == "$FLEET_REGISTRY_JSON"
    assert list(load_registry_from_env(None, {**env, "FLEET_REGISTRY_JSON": ""}).models) == [
        "from-file"]
    one = load_registry_from_env(None, {"MODEL_ID": "Org/Tiny-1B"}).models["tiny-1b"]
    assert (one.source, one.port, one.aliases) == ("Org/Tiny-1B", 8001, ("Org/Tiny-1B",))
    remote = load_registry_from_env(None, {"MODEL_ID": "Org/Tiny-1B", "MODEL_PORT": "9000",
                                           "MODEL_URL": "http://127.0.0.1:9000"})
    spec = remote.models["tiny-1b"]
    assert spec.urls == ("http://127.0.0.1:9000",) and spec.upstream_model == "Org/Tiny-1B"
    assert load_registry_from_env(None, {"MODEL_ID": "m", "MODEL_PORT": "8123"}).models["m"].port \
        == 8123
    with pytest.raises(RegistryError) as info:
        load_registry_from_env(None, {"FLEET_REGISTRY_JSON": '{"models": {"a": {"prot": 1}}}'})
    assert info.value.source == "$FLEET_REGISTRY_JSON" and "'prot'" in str(info.value)
    with pytest.raises(RegistryError, match="MODEL_PORT"):
        load_registry_from_env(None, {"MODEL_ID": "m", "MODEL_PORT": "x"})


def test_names_the_gateway_routes_own_are_reserved() -> None:
    found = problems('[models.admin]\nurl = "http://127.0.0.1:1"\n')
    assert found == ["model 'admin': the name is reserved for the gateway's own routes (admin, "
                     "health, metrics, v1, v2); pick another name and put 'admin' in `aliases` "
                     "if clients must use it"]
