"""Access: key loading (env, TOML/JSON file, admin key), constant-time matching, the middleware
(401/403 in vLLM's shape, credential headers stripped), per-model allow-lists, and the open
gateway. Upstreams are mocked with respx; the same rules run over real sockets in
test_gateway_service.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import respx

from fleet.registry import parse_registry
from gateway import auth
from gateway.app import create_app
from gateway.settings import GatewaySettings

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

A = "http://127.0.0.1:9101"
B = "http://127.0.0.1:9102"
REG = parse_registry(f"""
[models.a]
url = "{A}"
aliases = ["alpha"]
[models.b]
url = "{B}"
""")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
KEYS_TOML = """
[[keys]]
key = "sk-full"
name = "full"

[[keys]]
key = "sk-only-alpha"
name = "team-a"
models = ["alpha"]
"""


def settings(tmp_path: Path, **extra: object) -> GatewaySettings:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    return GatewaySettings(api_keys_file=str(keys), admin_key="sk-admin", **extra)


def error_of(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["code"] == status
    return body["error"]


def echo_headers(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"headers": dict(request.headers)})


async def client_for(s: GatewaySettings) -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    app = create_app(REG, s)
    with respx.mock(assert_all_called=False) as mock:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                yield client, mock


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    async for pair in client_for(settings(tmp_path)):
        yield pair


@pytest.fixture
async def open_gw() -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    async for pair in client_for(GatewaySettings()):
        yield pair


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- loading and matching -------------------------------------------------------------------


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    ring = auth.load_api_keys(settings(tmp_path, api_keys=" sk-env1 , ,sk-env2"))
    assert len(ring) == 4
    assert ring.match("sk-env2") == auth.Principal("env#2")
    assert ring.match("sk-only-alpha") == auth.Principal("team-a", frozenset({"alpha"}))
    assert ring.match("sk-env") is None and ring.match("") is None
    json_file = tmp_path / "keys.json"
    json_file.write_text('{"keys": [{"key": "j1", "models": ["b"]}]}')
    ring = auth.load_api_keys(GatewaySettings(api_keys_file=str(json_file)))
    assert ring.match("j1") == auth.Principal("keys.json#1", frozenset({"b"}))


@pytest.mark.parametrize(("text", "wanted"), [
    ('[[keys]]\nkey = "sk-secret-1"\nmodel = ["a"]\n', "unknown field(s) model"),
    ('[[keys]]\nkey = ""\n', "`key` must be a non-empty string"),
    ('[[keys]]\nkey = "sk-secret-1"\nmodels = "a"\n', "`models` must be a list"),
    ('keys = []\n', "non-empty list `keys`"),
    ('[[keys]]\nkey = "sk-secret-1\n', "not valid TOML"),
    ('[[keys]]\nkey = "sk-secret-1"\n[[keys]]\nkey = "sk-secret-1"\n', "more than once"),
])
def test_bad_keys_file_is_named_without_the_key(tmp_path: Path, text: str, wanted: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(auth.AccessConfigError) as info:
        auth.load_api_keys(GatewaySettings(api_keys_file=str(path)))
    assert wanted in str(info.value) and str(path) in str(info.value)
    assert "sk-secret" not in str(info.value)


def test_admin_key_from_file(tmp_path: Path) -> None:
    path = tmp_path / "admin"
    path.write_text("sk-adm\n")
    ring = auth.load_admin_key(GatewaySettings(admin_key_file=str(path)))
    assert ring.match("sk-adm") == auth.Principal("admin", admin=True)
    path.write_text("\n")
    with pytest.raises(auth.AccessConfigError, match="empty"):
        auth.load_admin_key(GatewaySettings(admin_key_file=str(path)))
    with pytest.raises(auth.AccessConfigError, match="cannot read"):
        auth.load_admin_key(GatewaySettings(admin_key_file=str(tmp_path / "none")))


def test_settings_never_show_a_key() -> None:
    s = GatewaySettings(api_keys="sk-visible", admin_key="sk-adm-visible")
    assert "sk-visible" not in repr(s) and "sk-adm-visible" not in repr(s)


def test_presented_key() -> None:
    assert auth.presented_key([(b"authorization", b"Bearer  abc ")]) == "abc"
    assert auth.presented_key([(b"authorization", b"bearer abc")]) == "abc"
    assert auth.presented_key([(b"x-api-key", b"xyz")]) == "xyz"
    assert auth.presented_key([(b"authorization", b"Basic Zm9v"), (b"x-api-key", b"k")]) == "k"
    assert auth.presented_key([(b"authorization", b"Basic Zm9v")]) is None
    assert auth.presented_key([]) is None


def test_paths_and_levels() -> None:
    access = auth.Access(auth.KeyRing([("k", auth.Principal("p"))]), auth.KeyRing())
    assert [access.classify(p) for p in ("/health", "/metrics", "/admin/status", "/admin",
                                         "/v1/models", "/anything", "/administrator")] == [
        "public", "public", "admin", "admin", "api", "api", "api"]
    # the dashboard: its page and files are public, its data is not, its log lines are admin
    assert [access.classify(p) for p in ("/ui", "/ui/", "/ui/static/dashboard.js",
                                         "/ui/api/snapshot", "/ui/api/logs/m", "/uix",
                                         "/ui/v1/chat/completions")] == [
        "public", "public", "public", "api", "admin", "api", "api"]
    access.metrics_public = False
    assert access.classify("/metrics") == "admin"
    assert access.check("admin", "k").status == 403  # no admin key configured
    assert access.check("api", None).status == 401
    assert access.check("api", "k") == auth.Principal("p")


def test_exposure_warning() -> None:
    open_access = auth.Access(auth.KeyRing(), auth.KeyRing())
    assert auth.exposure_warning(GatewaySettings(host="0.0.0.0"), open_access)
    assert auth.exposure_warning(GatewaySettings(host="127.0.0.1"), open_access) is None
    keyed = auth.Access(auth.KeyRing([("k", auth.Principal("p"))]), auth.KeyRing())
    assert auth.exposure_warning(GatewaySettings(host="0.0.0.0"), keyed) is None


def test_create_app_warns_when_exposed_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway"):
        create_app(REG, GatewaySettings(host="0.0.0.0"))
    assert "without API keys" in caplog.text


# -- the middleware and the allow-list --------------------------------------------------------


async def test_missing_and_wrong_keys_are_401(gw) -> None:
    client, mock = gw
    route = mock.route(host="127.0.0.1")
    resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    err = error_of(resp, 401)
    assert err["type"] == "AuthenticationError" and "Authorization: Bearer" in err["message"]
    assert resp.headers["www-authenticate"] == "Bearer" and len(resp.headers["x-request-id"]) == 32
    err = error_of(await client.get("/v1/models", headers=bearer("sk-nope")), 401)
    assert "not valid" in err["message"]
    error_of(await client.get("/no/such/path"), 401)  # unknown paths are not open either
    assert not route.called


async def test_valid_key_is_stripped_before_forwarding(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=echo_headers)
    for headers in (bearer("sk-full"), {"x-api-key": "sk-full"}, bearer("sk-admin")):
        resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT},
                                 headers={**headers, "x-other": "kept"})
        seen = resp.json()["headers"]
        assert resp.status_code == 200 and seen["x-other"] == "kept"
        assert "authorization" not in seen and "x-api-key" not in seen


async def test_allow_list_is_checked_once_the_model_is_known(gw) -> None:
    client, mock = gw
    ok = mock.post(f"{A}/v1/completions").respond(200, json={"ok": True})
    denied = mock.post(f"{B}/v1/completions").respond(200, json={"ok": True})
    key = bearer("sk-only-alpha")
    for path, model in (("/v1/completions", "a"), ("/v1/completions", "alpha"),
                        ("/alpha/v1/completions", None)):
        body = {"prompt": "x", **({"model": model} if model else {})}
        assert (await client.post(path, json=body, headers=key)).status_code == 200
    for path, body in (("/v1/completions", {"model": "b", "prompt": "x"}),
                       ("/b/v1/completions", {"prompt": "x"})):
        err = error_of(await client.post(path, json=body, headers=key), 403)
        assert err["type"] == "PermissionDeniedError" and "`b`" in err["message"]
        assert "alpha" in err["message"] and err["param"] == "model"
    error_of(await client.get("/b/health", headers=key), 403)
    error_of(await client.get("/v1/models/b", headers=key), 403)
    assert ok.call_count == 3 and not denied.called


async def test_models_listing_shows_only_allowed_models(gw) -> None:
    client, mock = gw
    mock.get(f"{A}/health").respond(200)
    mock.get(f"{B}/health").respond(200)
    listed = (await client.get("/v1/models", headers=bearer("sk-only-alpha"))).json()["data"]
    assert [m["id"] for m in listed] == ["a", "alpha"]  # the alias is an entry of its own
    listed = (await client.get("/v1/models", headers=bearer("sk-full"))).json()["data"]
    assert [m["id"] for m in listed] == ["a", "alpha", "b"]


async def test_unknown_model_lists_only_the_models_the_key_may_use(gw) -> None:
    client, _ = gw
    for method, path, body in (("POST", "/v1/chat/completions", {"model": "nope", **CHAT}),
                               ("POST", "/nope/v1/chat/completions", CHAT),
                               ("GET", "/v1/models/nope", None)):
        resp = await client.request(method, path, json=body, headers=bearer("sk-only-alpha"))
        message = error_of(resp, 404)["message"]
        listed = message.split("Valid models and aliases: ")[1].split(".")[0]
        assert listed == "a, alpha", message  # never `b`, which this key may not use
        resp = await client.request(method, path, json=body, headers=bearer("sk-full"))
        listed = error_of(resp, 404)["message"].split("aliases: ")[1].split(".")[0]
        assert listed == "a, alpha, b"


async def test_admin_key_and_api_keys_are_separate(gw) -> None:
    client, _ = gw
    # A valid API key is known but not allowed: 403 (a 401 would say "log in again").
    err = error_of(await client.get("/admin/status", headers=bearer("sk-full")), 403)
    assert "admin key" in err["message"]
    err = error_of(await client.get("/admin/status", headers=bearer("sk-nobody")), 401)
    assert "not valid" in err["message"]
    error_of(await client.get("/admin/status"), 401)
    assert (await client.get("/admin/status", headers=bearer("sk-admin"))).status_code == 200
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200


async def test_metrics_behind_the_admin_key_when_not_public(tmp_path: Path) -> None:
    async for client, _ in client_for(settings(tmp_path, metrics_public=False)):
        error_of(await client.get("/metrics"), 401)
        error_of(await client.get("/metrics", headers=bearer("sk-full")), 403)
        assert (await client.get("/metrics", headers=bearer("sk-admin"))).status_code == 200


async def test_open_gateway_forwards_credentials_and_disables_admin(open_gw) -> None:
    client, mock = open_gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=echo_headers)
    resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT},
                             headers=bearer("upstream-key"))
    assert resp.json()["headers"]["authorization"] == "Bearer upstream-key"
    err = error_of(await client.post("/admin/reload", headers=bearer("anything")), 403)
    assert "GATEWAY_ADMIN_KEY" in err["message"]


async def test_cors_is_off_by_default_and_configurable(open_gw) -> None:
    client, mock = open_gw
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    resp = await client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in resp.headers
    app = create_app(REG, GatewaySettings(cors_origins="https://app.example",
                                          api_keys="sk-1"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as cors_client:
        resp = await cors_client.options("/v1/chat/completions", headers=preflight)
        assert resp.status_code == 200  # preflights carry no key
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in resp.headers["access-control-allow-headers"].lower()
        resp = await cors_client.get("/v1/models", headers={"origin": "https://app.example"})
        assert resp.status_code == 401
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in resp.headers["access-control-expose-headers"]
        resp = await cors_client.options("/v1/chat/completions",
                                         headers={**preflight, "origin": "https://evil.example"})
        assert resp.status_code == 400
