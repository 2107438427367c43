"""What `fleet` prints: the status table, an operation's report, the gateway's load figures.

Data goes to the `out` stream (stdout), timings and diagnostics to `err` (stderr).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from fleet.report import ModelStatus, Report


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_status(rows: Sequence[ModelStatus]) -> str:
    header = ("MODEL", "REPLICA", "STATE", "PORT", "GPUS", "FRACTION", "UPTIME", "HEALTH",
              "DETAIL")
    table = [header]
    for r in rows:
        table.append((
            r.name, str(r.replica), r.state, str(r.port) if r.port is not None else "-",
            ",".join(str(g) for g in r.gpus) or "-",
            f"{r.fraction:g}" if r.fraction is not None and r.gpus else "-",
            _fmt_uptime(r.uptime), r.health, r.detail,
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def print_report(report: Report, args: argparse.Namespace, out: TextIO, err: TextIO,
                  label: Callable[[str, int], str] | None = None) -> None:
    if report.timings:
        print(f"{report.operation} {' '.join(report.target)}: {report.timing_line()}", file=err)
    if getattr(args, "json", False):
        print(json.dumps(report.as_dict(), indent=2), file=out)
        return
    for a in report.actions:
        note = f" ({a.note})" if a.note else ""
        who = label(a.model, a.replica) if label is not None else a.model
        print(f"{who}: {a.action}{note}", file=out)
    if report.operation != "down":
        print(f"awake: {', '.join(report.awake) or 'none'}", file=out)


def gateway_load(url: str, err: TextIO) -> dict[tuple[str, int], dict[str, Any]] | None:
    """(model, replica) -> the gateway's in-flight, queued and outstanding figures, from its
    /admin/status; None (with a warning) when the gateway cannot tell."""
    import httpx

    key = os.environ.get("GATEWAY_ADMIN_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(url.rstrip("/") + "/admin/status", params={"fleet": "false"},
                         headers=headers, timeout=5.0)
        resp.raise_for_status()
        models = resp.json()["models"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"fleet: warning: no figures from the gateway at {url}: {exc} (is it running? "
              f"is GATEWAY_ADMIN_KEY its admin key?)", file=err)
        return None
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for name, m in models.items():
        for rep in m.get("replicas", []):
            out[(name, rep["index"])] = {"in_flight": m["in_flight"], "queued": m["queued"],
                                         "outstanding": rep["outstanding"],
                                         "ejected": rep["ejected"],
                                         "scheduler": m.get("scheduler") or {}}
    return out


def format_gateway_load(rows: Sequence[ModelStatus],
                        load: dict[tuple[str, int], dict[str, Any]]) -> str:
    lines = ["", "GATEWAY  (requests per model: in flight / queued; per replica: outstanding)"]
    for r in rows:
        g = load.get((r.name, r.replica))
        if g is not None:
            lines.append(f"  {r.name} [{r.replica}]: {g['in_flight']} in flight, "
                         f"{g['queued']} queued, {g['outstanding']} outstanding"
                         + (" (taken out)" if g["ejected"] else "") + _scheduler_text(g))
    return "\n".join(lines)


def _scheduler_text(g: dict[str, Any]) -> str:
    """The gateway scheduler's word on a model: its state, oldest wait, why it drains, the
    quantum it has left while a rival waits."""
    s = g.get("scheduler") or {}
    if not s:
        return ""
    parts = [str(s.get("state"))]
    if s.get("oldest_wait") is not None:
        parts.append(f"oldest waiting {s['oldest_wait']:.1f}s")
    if s.get("quantum_left") is not None:
        parts.append(f"quantum left {s['quantum_left']:.1f}s (`{s.get('rival')}` waits)")
    if s.get("draining_because"):
        parts.append(f"draining: {s['draining_because']}")
    return "; " + ", ".join(parts)
