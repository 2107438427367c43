"""`fleet compose`: render the registry's compose file (one per registry, beside it), the
opt-in Docker-socket override, or with `--stack` the Swarm stack file; `--check` compares with
what is on disk (exit 1 with the diff on drift)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TextIO

from fleet.registry import Registry

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_compose(registry: Registry, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.stack:
        return _cmd_stack(registry, args, out, err)
    from fleet.compose import (
        compose_drift,
        compose_file_for,
        generated_from,
        render_compose,
    )

    reg_path = Path(registry.source)
    target = Path(args.output) if args.output and args.output != "-" else \
        reg_path.resolve().parent / compose_file_for(reg_path)
    if args.output != "-":
        try:
            rel = os.path.relpath(reg_path.resolve(), target.resolve().parent)
        except ValueError:
            rel = str(reg_path.resolve())
    else:
        rel = reg_path.name
    from fleet.api import load_settings

    kw: dict[str, Any] = {"registry_path_in_repo": rel, "project": args.project,
                          "name_prefix": load_settings().name_prefix,
                          "output_name": target.name if args.output != "-" else None}
    existing: str | None
    try:
        existing = target.read_text(encoding="utf-8") if args.output != "-" else None
    except FileNotFoundError:
        existing = None
    if args.check:
        if existing is None:
            print(f"{target} does not exist; write it with `fleet compose --registry "
                  f"{registry.source}`", file=err)
            return EXIT_FAILED
        diff = compose_drift(registry, existing, **kw)
        if diff is None:
            print(f"{target} is up to date with {registry.source}", file=err)
            return EXIT_OK
        out.write(diff)
        print(f"{target} differs from what {registry.source} renders; re-render it with "
              f"`fleet compose --registry {registry.source}`", file=err)
        return EXIT_FAILED
    text = render_compose(registry, **kw)
    if args.output == "-":
        out.write(text)
        return EXIT_OK
    source = generated_from(existing) if existing is not None else None
    if existing is not None and source != rel and not args.force:
        what = f"rendered from {source}" if source else "not rendered by `fleet compose`"
        print(f"refusing to overwrite {target}: it is {what}, not {rel}. Render "
              f"{registry.source} to its own file (the default: "
              f"{compose_file_for(reg_path)} beside it), or pass --force", file=err)
        return EXIT_USAGE
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}", file=err)
    _write_socket_override(target.parent, err)
    print(str(target), file=out)
    return EXIT_OK


def _cmd_stack(registry: Registry, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from fleet.api import load_settings
    from fleet.stack import render_stack, stack_drift

    if not registry.swarm:
        print(f"fleet: {registry.source} has no [cluster] engine = \"swarm\": a stack file is "
              f"for a Swarm; use `fleet compose` for one host", file=err)
        return EXIT_USAGE
    target = Path(args.output) if args.output and args.output != "-" else \
        Path(registry.source).resolve().parent / "stack.yaml"
    prefix = load_settings().name_prefix
    if args.check:
        try:
            existing = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"{target} does not exist; write it with `fleet compose --stack --output "
                  f"{target}`", file=err)
            return EXIT_FAILED
        diff = stack_drift(registry, existing, name_prefix=prefix)
        if diff is None:
            print(f"{target} is up to date with {registry.source}", file=err)
            return EXIT_OK
        out.write(diff)
        print(f"{target} differs from what {registry.source} renders; re-render it with "
              f"`fleet compose --stack --output {target}`", file=err)
        return EXIT_FAILED
    text = render_stack(registry, name_prefix=prefix)
    if args.output == "-":
        out.write(text)
        return EXIT_OK
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}", file=err)
    print(str(target), file=out)
    return EXIT_OK


def _write_socket_override(directory: Path, err: TextIO) -> None:
    """The opt-in Docker-socket override beside the compose file (same text for every
    registry; rewritten only when it differs)."""
    from fleet.compose import SOCKET_OVERRIDE_NAME, render_socket_override

    path = directory / SOCKET_OVERRIDE_NAME
    text = render_socket_override()
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except FileNotFoundError:
        pass
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} (opt-in: on-demand activation from the compose gateway; it mounts "
          f"the Docker socket)", file=err)
