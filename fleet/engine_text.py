"""Reading Docker's answers for messages: which error a daemon's text is (GPU runtime
missing, port taken), the useful part of a connection error, and what a create request was
about (model, GPUs, host ports). Pure text and dicts: no Docker import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fleet.spec import LABEL_MODEL

START_DOCKER_HINT = (
    "is dockerd running? start it with `sudo systemctl start docker` (or `sudo dockerd &` "
    "where there is no systemd), or point --docker-host / DOCKER_HOST at a running daemon"
)

PORT_RE = re.compile(
    r"(?:Bind for|listen tcp[46]?|bind) \[?([0-9a-fA-F.:]*?)\]?:(\d+)(?: failed|: bind)", re.I
)


def is_gpu_driver_error(text: str) -> bool:
    t = text.lower()
    return "could not select device driver" in t or "unknown or invalid runtime name: nvidia" in t


def is_port_error(text: str) -> bool:
    t = text.lower()
    return "port is already allocated" in t or "address already in use" in t


def short_reason(text: str) -> str:
    """The useful part of a requests/urllib3 connection error ("[Errno 111] Connection refused")."""
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if m:
        return m.group(0).strip()
    m = re.search(r"(No such file or directory|Connection refused|Name or service not known|"
                  r"timed out|Permission denied|Remote end closed connection without response)",
                  text)
    if m:
        return m.group(1)
    text = text.removeprefix("Error while fetching server API version: ")
    return re.sub(r"\s+", " ", text)[:200]


def model_of(kwargs: Mapping[str, Any]) -> str:
    return str((kwargs.get("labels") or {}).get(LABEL_MODEL, kwargs.get("name", "?")))


def gpu_ids(kwargs: Mapping[str, Any]) -> list[str]:
    ids: list[str] = []
    for req in kwargs.get("device_requests") or []:
        got = req.get("DeviceIDs") or req.get("device_ids") or []
        ids.extend(str(i) for i in got)
    return ids


def host_ports(kwargs: Mapping[str, Any]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for binding in (kwargs.get("ports") or {}).values():
        items = binding if isinstance(binding, list) else [binding]
        for b in items:
            if isinstance(b, tuple) and len(b) == 2:
                out.append((str(b[0]), int(b[1])))
            elif isinstance(b, int | str) and str(b).isdigit():
                out.append(("0.0.0.0", int(b)))
    return out
