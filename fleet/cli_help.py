"""`fleet COMMAND --help`: each command's description and an example (kept out of
fleet/cli.py, which builds the parser)."""

from __future__ import annotations

import argparse
from typing import Any

# One example per command, shown by `fleet COMMAND --help` under the command's description.
EXAMPLES = {
    "up": "fleet up                # the autostart models\nfleet up qwen-7b --json",
    "down": "fleet down qwen-7b\nfleet down              # every container of this fleet",
    "switch": "fleet switch qwen-32b\nfleet switch qwen-32b --dry-run",
    "sleep": "fleet sleep qwen-7b",
    "wake": "fleet wake qwen-7b",
    "scale": "fleet scale qwen-7b 2",
    "status": "fleet status\nfleet status --json --gateway http://127.0.0.1:8000",
    "logs": "fleet logs qwen-7b --follow --tail 50",
    "check": "fleet check --registry models.cpu.toml --host-cpus 2",
    "compose": "fleet compose\nfleet compose --check",
    "plan": "fleet plan switch qwen-32b",
}


def describe(subparsers: Any, prefix: str) -> None:
    """Give each subcommand's own --help its description (the one-line help) and an example."""
    helps = {a.dest: a.help for a in subparsers._choices_actions}
    for name, sub in subparsers.choices.items():
        text = helps.get(name) or ""
        sub.description = sub.description or (text[:1].upper() + text[1:]) or None
        example = EXAMPLES.get(name) if prefix == "fleet" else f"{prefix} {name} qwen-32b"
        if example and sub.epilog is None:
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            sub.epilog = "example:\n  " + example.replace("\n", "\n  ")
