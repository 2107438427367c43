"""fleet.spec: registry model -> container spec and docker-py kwargs (pure)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fleet.registry import load_registry, parse_registry
from fleet.spec import (
    DEFAULT_SHM_SIZE,
    HF_CACHE_TARGET,
    LABEL_MANAGED,
    LABEL_MODEL,
    LABEL_REPLICA,
    LABEL_SPEC_HASH,
    SpecError,
    container_name,
    container_spec,
    docker_run_kwargs,
    spec_hash,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_Sup3rSecretTokenValue"

BASE = """
[host]
gpus = [{ id = 0 }, { id = 1 }]

[defaults]
image = "vllm/vllm-openai:v0.32.0"
hf_cache = "~/.cache/huggingface"
models_dir = "/srv/models"
health_timeout = 600

[models.chat]
source = "org/chat-7b"
port = 8001
gpus = [0]
gpu_memory_utilization = 0.45
max_model_len = 4096
aliases = ["gpt-4o-mini", "chat-latest"]
args = ["--enable-prefix-caching"]
sleep_mode = true
env = { VLLM_LOGGING_LEVEL = "INFO" }

[models.big]
source = "org/big-32b"
port = 8002
gpus = [0, 1]
dedicated = true
gpu_memory_utilization = 0.9

[models.cpu]
source = "./tiny"
port = 8003
ipc_host = false
volumes = ["~/.cache/vllm:/root/.cache/vllm", "./extra:/extra:ro"]

[models.remote]
url = "http://10.0.0.5:8000"
"""


def reg(text: str = BASE):  # type: ignore[no-untyped-def]
    return parse_registry(text, source="test.toml")


def test_vllm_args_in_documented_order() -> None:
    spec = container_spec(reg(), "chat")
    assert spec.command == (
        "--model", "org/chat-7b",
        "--served-model-name", "chat", "gpt-4o-mini", "chat-latest",
        "--host", "0.0.0.0",
        "--port", "8001",
        "--gpu-memory-utilization", "0.45",
        "--max-model-len", "4096",
        "--enable-sleep-mode",
        "--enable-prefix-caching",
    )


def test_defaults_args_come_before_model_args() -> None:
    text = BASE.replace('health_timeout = 600', 'health_timeout = 600\nargs = ["--dtype", "float32"]')
    cmd = container_spec(reg(text), "chat").command
    assert cmd[-3:] == ("--dtype", "float32", "--enable-prefix-caching")


def test_tensor_parallel_size_only_for_several_gpus() -> None:
    big = container_spec(reg(), "big").command
    i = big.index("--tensor-parallel-size")
    assert big[i + 1] == "2"
    assert "--tensor-parallel-size" not in container_spec(reg(), "chat").command
    assert "--max-model-len" not in big
    assert "--enable-sleep-mode" not in big


def test_sleep_mode_enables_the_dev_endpoints() -> None:
    assert container_spec(reg(), "chat").environment["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in container_spec(reg(), "big").environment


def test_device_requests_for_gpus_and_none_for_cpu_only() -> None:
    big = container_spec(reg(), "big")
    assert big.gpu_device_ids == ("0", "1")
    kw = docker_run_kwargs(big, {})
    assert kw["device_requests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]]}]
    cpu = container_spec(reg(), "cpu")
    assert cpu.gpu_device_ids == ()
    assert "device_requests" not in docker_run_kwargs(cpu, {})


def test_kwargs_are_accepted_by_docker_py() -> None:
    # docker-py's own translation of run/create kwargs (no daemon involved): any unknown key
    # or wrongly shaped value raises here. Private helper, pinned by docker<8.
    from docker.models.containers import _create_container_args

    for name in ("chat", "big", "cpu"):
        kw = docker_run_kwargs(container_spec(reg(), name), {"HOME": "/home/u", "HF_TOKEN": "x"})
        kw.pop("detach")
        kw["version"] = "1.41"
        args = _create_container_args(dict(kw))
        host = args["host_config"]
        if name == "big":
            assert host["DeviceRequests"][0]["DeviceIDs"] == ["0", "1"]
        assert host["PortBindings"]


def test_local_sources_map_under_models_mount() -> None:
    def source_of(src: str, models_dir: str | None = '"/srv/models"') -> str:
        md = f"models_dir = {models_dir}" if models_dir else ""
        text = f'[defaults]\n{md}\n[models.m]\nsource = "{src}"\nport = 8001\n'
        cmd = container_spec(reg(text), "m").command
        return cmd[cmd.index("--model") + 1]

    assert source_of("./bge-small") == "/models/bge-small"
    assert source_of("/models/bge-small") == "/models/bge-small"
    assert source_of("/srv/models/sub/bge") == "/models/sub/bge"
    assert source_of("/opt/weights/x") == "/opt/weights/x"   # not under models_dir: as is
    assert source_of("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    with pytest.raises(SpecError, match="models_dir is not set"):
        source_of("./bge-small", models_dir=None)
    with pytest.raises(SpecError, match="leaves models_dir"):
        source_of("./../etc")


def test_volumes_hf_cache_models_dir_and_model_entries() -> None:
    spec = container_spec(reg(), "cpu")
    assert dict(spec.volumes) == {
        "~/.cache/huggingface": {"bind": HF_CACHE_TARGET, "mode": "rw"},
        "/srv/models": {"bind": "/models", "mode": "ro"},
        "~/.cache/vllm": {"bind": "/root/.cache/vllm", "mode": "rw"},
        "./extra": {"bind": "/extra", "mode": "ro"},
    }


def test_run_kwargs_expand_home_and_relative_paths() -> None:
    spec = container_spec(reg(), "cpu")
    kw = docker_run_kwargs(spec, {"HOME": "/home/alice"}, base_dir="/repo")
    assert kw["volumes"] == {
        "/home/alice/.cache/huggingface": {"bind": HF_CACHE_TARGET, "mode": "rw"},
        "/srv/models": {"bind": "/models", "mode": "ro"},
        "/home/alice/.cache/vllm": {"bind": "/root/.cache/vllm", "mode": "rw"},
        "/repo/extra": {"bind": "/extra", "mode": "ro"},
    }


def test_no_hf_cache_and_no_models_dir_means_no_mounts() -> None:
    text = '[defaults]\nhf_cache = ""\n[models.m]\nsource = "a/b"\nport = 8001\n'
    assert dict(container_spec(reg(text), "m").volumes) == {}


@pytest.mark.parametrize("bad", ["nocolon", "host:relative/path", "host:/x:rx", ":/x"])
def test_bad_volume_entries_are_refused(bad: str) -> None:
    text = f'[models.m]\nsource = "a/b"\nport = 8001\nvolumes = ["{bad}"]\n'
    with pytest.raises(SpecError, match="volumes"):
        container_spec(reg(text), "m")


def test_a_container_path_mounted_twice_is_refused() -> None:
    text = ('[defaults]\nmodels_dir = "/srv/models"\n[models.m]\nsource = "a/b"\nport = 8001\n'
            'volumes = ["/elsewhere:/models"]\n')
    with pytest.raises(SpecError, match="already mounted"):
        container_spec(reg(text), "m")


def test_hf_token_is_passed_through_never_stored() -> None:
    spec = container_spec(reg(), "chat")
    assert spec.passthrough_env == ("HF_TOKEN",)
    assert "HF_TOKEN" not in spec.environment
    kw = docker_run_kwargs(spec, {"HF_TOKEN": SECRET, "OTHER": "no"})
    assert kw["environment"]["HF_TOKEN"] == SECRET
    assert "OTHER" not in kw["environment"]
    assert SECRET not in json.dumps(kw["labels"])
    # The spec itself (and so its hash) never sees the value.
    assert SECRET not in repr(spec)
    assert container_spec(reg(), "chat").spec_hash == spec.spec_hash
    # Absent from the caller's environment: not set at all.
    assert "HF_TOKEN" not in docker_run_kwargs(spec, {})["environment"]


@pytest.mark.parametrize("var", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_a_token_in_the_registry_is_refused(var: str) -> None:
    text = f'[models.m]\nsource = "a/b"\nport = 8001\nenv = {{ {var} = "{SECRET}" }}\n'
    with pytest.raises(SpecError, match="export HF_TOKEN") as info:
        container_spec(reg(text), "m")
    assert SECRET not in str(info.value)


def test_ports_published_on_loopback_unless_the_registry_says_otherwise() -> None:
    assert dict(container_spec(reg(), "chat").ports) == {"8001/tcp": ("127.0.0.1", 8001)}
    text = BASE.replace('port = 8002', 'port = 8002\nhost_ip = "0.0.0.0"')
    assert dict(container_spec(reg(text), "big").ports) == {"8002/tcp": ("0.0.0.0", 8002)}
    assert container_spec(reg(), "chat").port == 8001


def test_labels_and_deterministic_name() -> None:
    spec = container_spec(reg(), "chat")
    assert spec.name == "vllm-fleet-chat"
    assert container_spec(reg(), "chat", name_prefix="t-123").name == "t-123-chat"
    assert dict(spec.labels) == {LABEL_MANAGED: "true", LABEL_MODEL: "chat",
                                 LABEL_REPLICA: "0", LABEL_SPEC_HASH: spec.spec_hash}


REPLICATED = BASE.replace("port = 8001\n", "port = 8001\nreplicas = 3\n", 1).replace(
    "port = 8002", "port = 8005").replace("port = 8003", "port = 8006")


def test_each_replica_has_its_own_name_port_label_and_health_check() -> None:
    r = reg(REPLICATED)
    specs = [container_spec(r, "chat", replica=i, cpuset=f"{i}") for i in range(3)]
    assert [s.name for s in specs] == ["vllm-fleet-chat", "vllm-fleet-chat-r1",
                                       "vllm-fleet-chat-r2"]
    assert [container_name("chat", "p", i) for i in range(2)] == ["p-chat", "p-chat-r1"]
    assert [s.port for s in specs] == [8001, 8002, 8003]
    assert [dict(s.ports) for s in specs][2] == {"8003/tcp": ("127.0.0.1", 8003)}
    for i, s in enumerate(specs):
        assert s.replica == i and s.labels[LABEL_REPLICA] == str(i)
        assert s.command[s.command.index("--port") + 1] == str(8001 + i)
        assert s.healthcheck["test"][-1] == f"http://127.0.0.1:{8001 + i}/health"
        assert s.gpu_device_ids == ("0",) and s.cpuset_cpus == str(i)
        assert "--gpu-memory-utilization" in s.command and "0.45" in s.command
        assert spec_hash(s) == s.spec_hash
    assert len({s.spec_hash for s in specs}) == 3
    with pytest.raises(SpecError, match="no replica 3"):
        container_spec(r, "chat", replica=3)


def test_replica_zero_hashes_as_the_single_container_did() -> None:
    # Containers made before replicas existed carry no replica label and the same hash:
    # they are adopted, not recreated. The replica label is not part of the material.
    spec = container_spec(reg(), "chat")
    without = {k: v for k, v in spec.labels.items() if k != LABEL_REPLICA}
    assert spec_hash(replace(spec, labels=without)) == spec.spec_hash
    assert container_spec(reg(REPLICATED), "chat").spec_hash == spec.spec_hash


def test_ipc_host_or_shm_size() -> None:
    chat = container_spec(reg(), "chat")
    assert (chat.ipc_mode, chat.shm_size) == ("host", None)
    cpu = container_spec(reg(), "cpu")
    assert (cpu.ipc_mode, cpu.shm_size) == (None, DEFAULT_SHM_SIZE)
    text = BASE.replace("ipc_host = false", 'ipc_host = false\nshm_size = "1g"')
    assert container_spec(reg(text), "cpu").shm_size == "1g"
    kw = docker_run_kwargs(chat, {})
    assert kw["ipc_mode"] == "host" and "shm_size" not in kw


def test_healthcheck_probes_vllm_health_with_start_period() -> None:
    hc = container_spec(reg(), "chat").healthcheck
    assert hc["test"][0] == "CMD"
    assert hc["test"][-1] == "http://127.0.0.1:8001/health"
    assert hc["start_period"] == 600 * 10**9
    assert hc["interval"] > 0 and hc["timeout"] > 0 and hc["retries"] >= 1


def test_cpuset_is_carried_and_changes_the_hash() -> None:
    a = container_spec(reg(), "chat", cpuset="2-9")
    assert a.cpuset_cpus == "2-9"
    assert docker_run_kwargs(a, {})["cpuset_cpus"] == "2-9"
    assert a.spec_hash != container_spec(reg(), "chat", cpuset="10-17").spec_hash
    assert "cpuset_cpus" not in docker_run_kwargs(container_spec(reg(), "chat"), {})


def test_hash_is_stable_and_matches_its_recomputation() -> None:
    a = container_spec(reg(), "chat")
    b = container_spec(reg(), "chat")
    assert a == b and a.spec_hash == b.spec_hash
    assert spec_hash(a) == a.spec_hash
    assert len(a.spec_hash) == 16 and int(a.spec_hash, 16) >= 0


@pytest.mark.parametrize("old,new", [
    ('image = "vllm/vllm-openai:v0.32.0"', 'image = "vllm/vllm-openai:v0.33.0"'),
    ("gpu_memory_utilization = 0.45", "gpu_memory_utilization = 0.4"),
    ("max_model_len = 4096", "max_model_len = 8192"),
    ('args = ["--enable-prefix-caching"]', "args = []"),
    ('aliases = ["gpt-4o-mini", "chat-latest"]', 'aliases = ["gpt-4o-mini"]'),
    ("port = 8001", "port = 8011"),
    ("gpus = [0]\n", "gpus = [1]\n"),
    ('env = { VLLM_LOGGING_LEVEL = "INFO" }', 'env = { VLLM_LOGGING_LEVEL = "DEBUG" }'),
    ("health_timeout = 600", "health_timeout = 300"),
    ('models_dir = "/srv/models"', 'models_dir = "/data/models"'),
])
def test_hash_changes_on_fields_that_need_a_new_container(old: str, new: str) -> None:
    assert old in BASE
    assert container_spec(reg(), "chat").spec_hash != container_spec(
        reg(BASE.replace(old, new, 1)), "chat").spec_hash


def test_hash_ignores_fields_that_do_not_touch_the_container() -> None:
    text = BASE.replace('source = "org/chat-7b"',
                        'source = "org/chat-7b"\ndescription = "x"\ntags = ["a"]\nautostart = false')
    assert container_spec(reg(), "chat").spec_hash == container_spec(reg(text), "chat").spec_hash


def test_hash_label_excluded_from_its_own_material() -> None:
    spec = container_spec(reg(), "chat")
    assert spec_hash(replace(spec, labels={**spec.labels, LABEL_SPEC_HASH: "other"})) == spec.spec_hash
    assert spec_hash(replace(spec, image="other:tag")) != spec.spec_hash


def test_remote_and_unknown_models() -> None:
    with pytest.raises(SpecError, match="remote model"):
        container_spec(reg(), "remote")
    with pytest.raises(KeyError):
        container_spec(reg(), "nope")


def test_shipped_registry_specs() -> None:
    registry = load_registry(ROOT / "models.toml")
    embed = container_spec(registry, "embed")
    assert embed.command[embed.command.index("--model") + 1] == "/models/bge-small-en-v1.5"
    assert container_spec(registry, "qwen-32b").gpu_device_ids == ("0", "1")


def test_cpu_model_sleep_mode_uses_dev_mode_without_the_flag() -> None:
    reg = parse_registry('[models.c]\nsource = "org/c"\nport = 9100\nsleep_mode = true\n')
    spec = container_spec(reg, "c")
    assert "--enable-sleep-mode" not in spec.command
    assert spec.environment["VLLM_SERVER_DEV_MODE"] == "1"


def test_containers_keep_bounded_json_file_logs() -> None:
    kw = docker_run_kwargs(container_spec(reg(), "chat"), {})
    assert kw["log_config"] == {"type": "json-file",
                                "config": {"max-size": "20m", "max-file": "3"}}
