"""`fleet`: run the registry's models as Docker containers.

    fleet [--registry PATH] [--docker-host URL] [--quiet] COMMAND ...

    up [MODEL...]            start/adopt/recreate the models (default: autostart ones), wait healthy
    down [MODEL...]          stop and remove containers (default: all of this fleet's)
    switch MODEL [--force] [--dry-run]
                             make MODEL awake, evicting what the planner says; timings on stderr
    sleep MODEL / wake MODEL vLLM sleep mode (stop/start for models without it), all replicas
    scale MODEL N            start or stop replicas until N are awake (never evicts)
    status [--json]          state, port, GPUs, fraction, uptime, health of every replica
    logs MODEL [--replica I] [--follow] [--tail N]
    check [--json]           the planner's verdict on the registry (exit 2 on a violation)
    compose [--check] [--output PATH]
                             render the registry's compose file (models.toml -> compose.yaml,
                             models.X.toml -> compose.X.yaml; `--check`: exit 1 on drift)
    plan switch MODEL        what `switch` would do now (dry run)

Data goes to stdout, progress and diagnostics to stderr: up, switch, wake and scale pull a
missing image (the registry's `pull` setting) with per-layer progress, and say every few
seconds how far each loading model is, with its latest log line (`--quiet`: no progress
lines). Exit codes: 0 ok, 1 failed
(including Docker unreachable, a model that did not become healthy, a refused switch),
2 usage or configuration error (invalid registry, unknown model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from fleet.api import SettingsError
from fleet.cli_compose import cmd_compose
from fleet.cli_help import describe
from fleet.cli_output import format_gateway_load, format_status, gateway_load, print_report
from fleet.errors import EngineError, FleetError, LockTimeout, ProbeError, RegistryError
from fleet.lifecycle import Fleet
from fleet.registry import Registry, load_registry, registry_path
from fleet.spec import SpecError
from fleet.version import version

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

FleetBuilder = Callable[[Registry, argparse.Namespace, Callable[[str], None]], Fleet]


def _default_builder(registry: Registry, args: argparse.Namespace,
                     progress: Callable[[str], None]) -> Fleet:
    from fleet.api import build_fleet, load_settings

    overrides: dict[str, Any] = {}
    if args.docker_host:
        overrides["docker_host"] = args.docker_host
    return build_fleet(registry, load_settings(**overrides), progress=progress)


def _global_options(default: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--registry", metavar="PATH", default=default,
                   help="registry file (default: $FLEET_REGISTRY, else ./models.toml)")
    p.add_argument("--docker-host", metavar="URL", default=default,
                   help="Docker daemon (default: $DOCKER_HOST, else the local socket)")
    p.add_argument("--host-cpus", metavar="N", type=int, default=default,
                   help="override [host].cpus, the cores the planner budgets")
    p.add_argument("--host-gpus", metavar="IDS", default=default,
                   help="override [host].gpus with these ids, e.g. 0,1")
    p.add_argument("--quiet", "-q", action="store_true", default=default,
                   help="no progress lines on stderr (pulls, starts, loads); errors and the "
                        "timings still")
    return p


def build_parser() -> argparse.ArgumentParser:
    # Accepted before and after the command; after it, only when given (SUPPRESS), so the
    # subcommand does not overwrite a value given before it.
    common = _global_options(argparse.SUPPRESS)
    json_opt = argparse.ArgumentParser(add_help=False)
    json_opt.add_argument("--json", action="store_true", help="print JSON on stdout")

    parser = argparse.ArgumentParser(
        prog="fleet", description="Run the registry's vLLM models as Docker containers.",
        parents=[_global_options(None)])
    parser.add_argument("--version", action="version", version=f"fleet (vllm-fleet) {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("up", parents=[common, json_opt],
                       help="start (or adopt, recreate, wake) models and wait until healthy")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p = sub.add_parser("down", parents=[common, json_opt],
                       help="stop and remove models' containers")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p = sub.add_parser("switch", parents=[common, json_opt],
                       help="make MODEL awake, evicting others as planned")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--force", action="store_true",
                   help="evict busy models too (their in-flight requests fail)")
    p.add_argument("--dry-run", action="store_true", help="only print the plan")
    for name, text in (("sleep", "put MODEL to sleep (stop it without sleep_mode)"),
                       ("wake", "wake MODEL (start it if stopped) without evicting others")):
        p = sub.add_parser(name, parents=[common, json_opt], help=text)
        p.add_argument("model", metavar="MODEL")
    p = sub.add_parser("scale", parents=[common, json_opt],
                       help="start or stop replicas of MODEL until N are awake (never evicts)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("replicas", type=int, metavar="N")
    p = sub.add_parser("status", parents=[common, json_opt],
                       help="state of every model (one row per replica)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not call /health (Docker's view only; faster)")
    p.add_argument("--gateway", metavar="URL", default=os.environ.get("FLEET_GATEWAY_URL"),
                   help="add the gateway's in-flight and queued requests per model, read from "
                        "its /admin/status (default $FLEET_GATEWAY_URL; admin key from "
                        "$GATEWAY_ADMIN_KEY)")
    p = sub.add_parser("logs", parents=[common], help="a model's container logs")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--replica", type=int, default=0, metavar="I",
                   help="which replica (default 0)")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--tail", type=int, default=100, metavar="N")
    sub.add_parser("check", parents=[common, json_opt],
                   help="validate the registry and its placement (exit 2 on a violation)")
    p = sub.add_parser("compose", parents=[common],
                       help="render the registry's compose file (and the opt-in "
                            "Docker-socket override)")
    p.add_argument("--output", "-o", metavar="PATH",
                   help="where to write (default: beside the registry, named after it: "
                        "models.toml -> compose.yaml, models.X.toml -> compose.X.yaml, "
                        "NAME.toml -> NAME.compose.yaml; '-' = stdout)")
    p.add_argument("--check", action="store_true",
                   help="compare with the existing file; exit 1 with the diff on drift")
    p.add_argument("--project", default="vllm-fleet", help="compose project name")
    p.add_argument("--stack", action="store_true",
                   help="render the stack file for `docker stack deploy` (a Swarm registry; "
                        "default output stack.yaml beside the registry)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --output file rendered from another registry")
    p = sub.add_parser("plan", parents=[common], help="dry runs")
    plan_sub = p.add_subparsers(dest="plan_command", metavar="WHAT", required=True)
    p = plan_sub.add_parser("switch", parents=[common, json_opt],
                            help="what `fleet switch MODEL` would do now")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--force", action="store_true")
    describe(sub, "fleet")
    describe(plan_sub, "fleet plan")
    return parser



# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def _cmd_check(registry: Registry, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from fleet.api import load_settings
    from fleet.check import check_registry

    violations = check_registry(registry, name_prefix=load_settings().name_prefix)
    managed = [n for n, m in registry.models.items() if m.managed]
    if args.json:
        print(json.dumps({"ok": not violations, "registry": registry.source,
                          "models": managed,
                          "violations": [{"kind": v.kind, "message": v.message}
                                         for v in violations]}, indent=2), file=out)
    elif violations:
        print(f"{registry.source}: {len(violations)} violation(s):", file=out)
        for v in violations:
            print(f"  - [{v.kind}] {v.message}", file=out)
    else:
        autostart = [n for n in managed if registry.models[n].autostart]
        print(f"{registry.source}: ok: {len(managed)} managed model(s); every model fits "
              f"alone and the autostart models ({', '.join(autostart) or 'none'}) fit "
              f"together", file=out)
    return EXIT_USAGE if violations else EXIT_OK


def _cmd_status(fleet: Fleet, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rows = fleet.status(probe=not args.no_probe)
    load = gateway_load(args.gateway, err) if args.gateway else None
    if args.json:
        data = [r.as_dict() for r in rows]
        if load is not None:
            for row in data:
                row["gateway"] = load.get((row["name"], row["replica"]))
        print(json.dumps(data, indent=2), file=out)
    else:
        print(format_status(rows), file=out)
        if load is not None:
            print(format_gateway_load(rows, load), file=out)
    return EXIT_OK


def _cmd_plan(fleet: Fleet, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from fleet.planner import describe_plan

    fleet.model(args.model)
    plan = fleet.plan(args.model, force=args.force)
    if getattr(args, "json", False):
        print(json.dumps({
            "target": plan.target, "ok": plan.ok, "start_action": plan.start_action,
            "evict": [{"model": e.model, "action": e.action, "reason": e.reason}
                      for e in plan.evict],
            "violations": [{"kind": v.kind, "message": v.message} for v in plan.violations],
        }, indent=2), file=out)
    else:
        print(describe_plan(plan), file=out)
    return EXIT_OK if plan.ok else EXIT_FAILED


def _cmd_logs(fleet: Fleet, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.follow:
        for line in fleet.follow_logs(args.model, tail=args.tail, replica=args.replica):
            print(line, file=out, flush=True)
    else:
        out.write(fleet.logs(args.model, tail=args.tail, replica=args.replica))
    return EXIT_OK


def _run_fleet_command(fleet: Fleet, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cmd = args.command
    if cmd == "status":
        return _cmd_status(fleet, args, out, err)
    if cmd == "logs":
        return _cmd_logs(fleet, args, out, err)
    if cmd == "plan" or (cmd == "switch" and args.dry_run):
        return _cmd_plan(fleet, args, out, err)
    if cmd == "up":
        report = fleet.up(args.models or None)
    elif cmd == "down":
        report = fleet.down(args.models or None)
    elif cmd == "switch":
        report = fleet.switch(args.model, force=args.force)
    elif cmd == "sleep":
        report = fleet.sleep(args.model)
    elif cmd == "wake":
        report = fleet.wake(args.model)
    elif cmd == "scale":
        report = fleet.scale(args.model, args.replicas)
    else:  # pragma: no cover - argparse only lets known commands through
        raise AssertionError(cmd)
    print_report(report, args, out, err, fleet.label)
    return EXIT_OK


def _with_host_overrides(registry: Registry, args: argparse.Namespace) -> Registry:
    overrides: dict[str, Any] = {}
    if getattr(args, "host_cpus", None) is not None:
        overrides["cpus"] = args.host_cpus
    if getattr(args, "host_gpus", None) is not None:
        try:
            overrides["gpus"] = [int(g) for g in args.host_gpus.split(",") if g.strip()]
        except ValueError:
            raise RegistryError("--host-gpus", [f"{args.host_gpus!r} is not a comma-separated "
                                                f"list of GPU ids, e.g. 0,1"]) from None
    return registry.with_host(**overrides) if overrides else registry


def main(
    argv: Sequence[str] | None = None,
    *,
    fleet_builder: FleetBuilder | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=err, flush=True)

    try:
        registry = _with_host_overrides(load_registry(registry_path(args.registry)), args)
        if args.command == "check":
            return _cmd_check(registry, args, out, err)
        if args.command == "compose":
            return cmd_compose(registry, args, out, err)
        fleet = (fleet_builder or _default_builder)(registry, args, progress)
        return _run_fleet_command(fleet, args, out, err)
    except (RegistryError, SpecError) as exc:
        print(f"fleet: {exc}", file=err)
        return EXIT_USAGE
    except SettingsError as exc:
        print(f"fleet: {exc}", file=err)
        return EXIT_USAGE
    except FleetError as exc:
        print(f"fleet: {exc}", file=err)
        return exc.exit_code
    except (EngineError, LockTimeout, ProbeError) as exc:
        print(f"fleet: {exc}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fleet: interrupted", file=err)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
