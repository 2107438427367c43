"""Who may call the gateway: API keys (each optionally limited to some models), the admin
key, and the ASGI middleware that checks them before any route runs.

- API keys come from `GATEWAY_API_KEYS` (comma-separated) and/or `GATEWAY_API_KEYS_FILE`, a
  TOML or JSON file (JSON when the name ends in .json)::

      [[keys]]
      key = "sk-team-a-..."
      name = "team-a"              # optional: what logs show instead of the key
      models = ["llama", "qwen"]   # optional allow-list (names or aliases); omitted: every model

  With no API key configured the gateway is open: every request passes and its credentials
  reach the upstream untouched (so a vLLM started with its own `--api-key` still works).
- A request presents a key as `Authorization: Bearer <key>` (what OpenAI clients send) or
  `x-api-key: <key>`. Keys are held as SHA-256 digests and compared with
  `hmac.compare_digest`, every configured key each time. No key is ever logged.
- When API keys are configured, the credential headers are removed once checked: the upstream
  never receives a gateway key.
- `/admin/...` needs the admin key (`GATEWAY_ADMIN_KEY` or `GATEWAY_ADMIN_KEY_FILE`, a file
  holding the key); without one configured the admin endpoints answer 403 saying how to enable
  them. The admin key also passes wherever an API key does (every model).
- Public without a key: `GET /health`, the dashboard's page and files (`/ui/`,
  `/ui/static/...`; its data under `/ui/api/` is not, and its log lines need the admin key),
  and `/metrics` unless
  `GATEWAY_METRICS_PUBLIC=false` (then it needs the admin key). Every other path needs an
  API key (when keys are configured), whether or not a route exists for it: a new route is
  never open by accident.
- The per-model allow-list is checked by the app once the model is known (`authorize`),
  before anything is forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from fleet.registry import Registry
from gateway import errors
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.auth")

PUBLIC, API, ADMIN = "public", "api", "admin"
CREDENTIAL_HEADERS = frozenset((b"authorization", b"x-api-key"))  # stripped when keys are on
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class AccessConfigError(ValueError):
    """A key setting or file is unusable; the message never contains a key."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The holder of a valid key, as the app sees it (never the key itself)."""

    name: str
    models: frozenset[str] | None = None  # allowed names and aliases; None: every model
    admin: bool = False

    def may_use(self, model: str, aliases: Iterable[str] = ()) -> bool:
        if self.models is None:
            return True
        return model in self.models or any(a in self.models for a in aliases)


class KeyRing:
    """Known keys (as digests) -> who holds them."""

    def __init__(self, entries: Sequence[tuple[str, Principal]] = ()) -> None:
        self._entries = [(_digest(key), principal) for key, principal in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, presented: str) -> Principal | None:
        """The holder of `presented`, comparing in constant time against every key."""
        digest = _digest(presented)
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Access:
    """The gateway's access policy: API keys, admin key, and which paths are public."""

    def __init__(self, api: KeyRing, admin: KeyRing, *, metrics_public: bool = True) -> None:
        self.api = api
        self.admin = admin
        self.metrics_public = metrics_public

    @property
    def open(self) -> bool:
        """True when no API key is configured: model routes need no key."""
        return not len(self.api)

    def classify(self, path: str) -> str:
        """PUBLIC, API or ADMIN: what a request to `path` must present."""
        if path == "/health":
            return PUBLIC
        if path == "/metrics":
            return PUBLIC if self.metrics_public else ADMIN
        if path in ("/ui", "/ui/") or path.startswith("/ui/static/"):
            return PUBLIC  # the dashboard's page and files hold no data; /ui/api/ needs a key
        if path == "/admin" or path.startswith(("/admin/", "/ui/api/logs/")):
            return ADMIN
        return API

    def check(self, level: str, presented: str | None) -> Principal | errors.GatewayError | None:
        """The principal (None when the gateway is open), or the error to answer."""
        if level == ADMIN:
            if not len(self.admin):
                return errors.GatewayError(
                    403, "The admin endpoints are disabled: set GATEWAY_ADMIN_KEY (or "
                         "GATEWAY_ADMIN_KEY_FILE) when starting the gateway and send it as "
                         "`Authorization: Bearer <admin key>`.")
            if not presented:
                return _unauthorized("The admin endpoints need the admin key: send "
                                     "`Authorization: Bearer <admin key>`.")
            admin = self.admin.match(presented)
            if admin is not None:
                return admin
            if self.api.match(presented) is not None:  # who it is is known: not allowed
                return errors.GatewayError(
                    403, "This API key may not use the admin endpoints; they need the admin "
                         "key (GATEWAY_ADMIN_KEY).")
            return _unauthorized("The admin key is not valid.")
        if self.open:
            return None
        if not presented:
            return _unauthorized("This gateway needs an API key: send `Authorization: Bearer "
                                 "<key>` (or `x-api-key: <key>`).")
        principal = self.api.match(presented) or self.admin.match(presented)
        return principal or _unauthorized("The API key is not valid for this gateway.")


def _unauthorized(message: str) -> errors.GatewayError:
    return errors.GatewayError(401, message)


def authorize(principal: Principal | None, model: str, aliases: Iterable[str]) -> None:
    """GatewayError 403 unless `principal` may use `model` (None: the gateway is open)."""
    if principal is not None and not principal.may_use(model, aliases):
        allowed = ", ".join(sorted(principal.models or ())) or "(none)"
        raise errors.GatewayError(403, f"This API key may not use model `{model}`; it may use: "
                                       f"{allowed}.", param="model")


# -- loading ------------------------------------------------------------------------------


def visible_names(principal: Principal | None, registry: Registry) -> list[str]:
    """The model names and aliases `principal` may use (all of them when the gateway is open
    or the key has no allow-list): what an unknown-model error may list to that caller."""
    if principal is None or principal.models is None:
        return list(registry.alias_table())
    return [name for name, spec in registry.alias_table().items()
            if principal.may_use(spec.name, spec.aliases)]


def load_access(settings: GatewaySettings) -> Access:
    """The policy from the settings; AccessConfigError names the unusable setting."""
    return Access(load_api_keys(settings), load_admin_key(settings),
                  metrics_public=settings.metrics_public)


def load_api_keys(settings: GatewaySettings) -> KeyRing:
    entries: list[tuple[str, Principal]] = []
    if settings.api_keys is not None:
        raw = [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
        entries += [(k, Principal(f"env#{i}")) for i, k in enumerate((k for k in raw if k), 1)]
    if settings.api_keys_file:
        entries += _read_keys_file(Path(settings.api_keys_file))
    seen: set[bytes] = set()
    for key, principal in entries:
        digest = _digest(key)
        if digest in seen:
            where = " ".join(filter(None, ("GATEWAY_API_KEYS" if settings.api_keys else "",
                                           f"GATEWAY_API_KEYS_FILE {settings.api_keys_file}"
                                           if settings.api_keys_file else "")))
            raise AccessConfigError(f"{where}: the key of {principal.name!r} is listed more "
                                    f"than once; keep one entry per key")
        seen.add(digest)
    return KeyRing(entries)


def load_admin_key(settings: GatewaySettings) -> KeyRing:
    key = settings.admin_key.get_secret_value().strip() if settings.admin_key else ""
    if settings.admin_key_file:
        path = Path(settings.admin_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessConfigError(f"GATEWAY_ADMIN_KEY_FILE {path}: cannot read it "
                                    f"({type(exc).__name__})") from None
        if not key:
            raise AccessConfigError(f"GATEWAY_ADMIN_KEY_FILE {path}: the file is empty")
    return KeyRing([(key, Principal("admin", admin=True))] if key else [])


_KEY_FIELDS = ("key", "name", "models")


def _read_keys_file(path: Path) -> list[tuple[str, Principal]]:
    where = f"GATEWAY_API_KEYS_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessConfigError(f"{where}: cannot read it ({type(exc).__name__})") from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        fmt = "JSON" if path.suffix == ".json" else "TOML"
        # The parser's message may quote the line (a key): say where, not what.
        line = getattr(exc, "lineno", None)
        raise AccessConfigError(f"{where}: not valid {fmt}"
                                + (f" (line {line})" if line else "")) from None
    items = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise AccessConfigError(f"{where}: expected a non-empty list `keys` of tables "
                                f"([[keys]] key = \"...\", optional name and models)")
    out: list[tuple[str, Principal]] = []
    for i, item in enumerate(items, 1):
        here = f"{where}: keys entry {i}"
        if not isinstance(item, dict):
            raise AccessConfigError(f"{here}: must be a table with `key`")
        unknown = sorted(set(item) - set(_KEY_FIELDS))
        if unknown:
            raise AccessConfigError(f"{here}: unknown field(s) {', '.join(unknown)}; allowed: "
                                    f"{', '.join(_KEY_FIELDS)}")
        key, models = item.get("key"), item.get("models")
        name = item.get("name", f"{path.name}#{i}")
        if not isinstance(key, str) or not key.strip():
            raise AccessConfigError(f"{here}: `key` must be a non-empty string")
        if not isinstance(name, str):
            raise AccessConfigError(f"{here}: `name` must be a string")
        if models is not None and (not isinstance(models, list)
                                   or not all(isinstance(m, str) for m in models)):
            raise AccessConfigError(f"{here}: `models` must be a list of model names or aliases")
        allowed = frozenset(models) if models is not None else None
        out.append((key.strip(), Principal(name, allowed)))
    return out


def exposure_warning(settings: GatewaySettings, access: Access) -> str | None:
    """A warning for a gateway bound beyond loopback with no API key, else None."""
    if access.open and settings.host not in _LOOPBACK:
        return (f"the gateway listens on {settings.host} without API keys: anyone who can "
                f"reach it may use every model. Set GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE.")
    return None


# -- middleware ----------------------------------------------------------------------------


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>`, else `x-api-key`."""
    bearer = other = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            bearer = token.strip() if scheme.lower() == "bearer" else ""
        elif name == b"x-api-key":
            other = value.decode("latin-1").strip()
    return bearer or other or None


class AccessGuard:
    """Checks the key a request presents against the path's level before routing.

    Called with an HTTP request's scope: None to go on, with the principal put in
    `scope["state"]["principal"]` for the per-model check and the credential headers stripped
    when keys are on; else the refusal to send (401/403 in vLLM's error shape).
    `on_reject(scope, status)` is called for every request it refuses (metrics, access log).
    """

    def __init__(self, access: Access,
                 on_reject: Callable[[Scope, int], None] | None = None) -> None:
        self.access = access
        self.on_reject = on_reject

    def __call__(self, scope: Scope) -> ASGIApp | None:
        access = self.access
        level = access.classify(scope["path"])
        if level == PUBLIC or (level == API and access.open):
            return None
        headers = scope["headers"]
        outcome = access.check(level, presented_key(headers))
        if isinstance(outcome, errors.GatewayError):
            state = scope.setdefault("state", {})
            extra = {"x-request-id": state.get("request_id", "-")}
            if outcome.status == 401:
                extra["www-authenticate"] = "Bearer"
            if self.on_reject is not None:
                self.on_reject(scope, outcome.status)
            return outcome.response(extra)
        scope.setdefault("state", {})["principal"] = outcome
        if not access.open:
            scope["headers"] = [(k, v) for k, v in headers if k not in CREDENTIAL_HEADERS]
        return None


class AccessMiddleware:
    """`AccessGuard` as an ASGI middleware (Starlette's stack)."""

    def __init__(self, app: ASGIApp, access: Access,
                 on_reject: Callable[[Scope, int], None] | None = None) -> None:
        self.app = app
        self.access = access
        self.guard = AccessGuard(access, on_reject)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.guard(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
