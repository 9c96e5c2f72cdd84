"""`ksift` command line: run, alerts, doctor, rules check, config check.

Exit status: 0 ok, 1 runtime failure (BPF, store, privileges), 2 bad input
(config, rules, arguments). Errors are one clear line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from datetime import datetime, timezone

from ksift.cli.checks import check_limit, non_empty
from ksift.errors import BpfError, ConfigError, KsiftError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("ksift")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksift", description="eBPF alerting agent: a few alerts with context, "
                                                          "not a firehose of events.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="watch the host and alert")
    run.add_argument("--config", metavar="FILE", help="agent config (TOML); defaults are built in")
    run.add_argument("--rules", metavar="FILE", help="rules file (TOML); default: the packaged rules")
    run.add_argument("--db", metavar="PATH", help="SQLite alert store (default: /var/lib/ksift/ksift.db as root)")
    run.add_argument("--json", action="store_true", help="print alerts as one JSON object per line")
    run.add_argument("--for", dest="duration", type=float, metavar="SECONDS", help="stop after this long")
    run.add_argument("--stats", metavar="FILE", help="write the funnel counters as JSON here on exit")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="stderr log level")
    run.add_argument("--api", metavar="LISTEN|off", help="HTTP API/metrics/dashboard address, e.g. 127.0.0.1:9466 "
                                                         "(overrides [api] listen); off: no API")

    alerts = sub.add_parser("alerts", help="list stored alerts")
    alerts.add_argument("--db", metavar="PATH", help="SQLite alert store")
    alerts.add_argument("--json", action="store_true", help="one JSON object per line")
    alerts.add_argument("--since", metavar="D", help="e.g. 10m, 2h, 1d or an RFC 3339 time")
    alerts.add_argument("--rule", help="only this rule")
    alerts.add_argument("--limit", type=int, default=100, help="at most this many (newest)")

    sub.add_parser("doctor", help="check what will and will not work on this host, and why")

    dashboard = sub.add_parser("dashboard", help="print the address that logs this host's browser into the "
                                                 "dashboard (reads the API token: root)")
    dashboard.add_argument("--config", metavar="FILE", help="agent config (TOML), as given to ksift run")
    dashboard.add_argument("--db", metavar="PATH", help="the alert store ksift run uses (the token is next to it)")

    rules = sub.add_parser("rules", help="work with rules files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    check = rules_sub.add_parser("check", help="validate a rules file")
    check.add_argument("file")
    rules_sub.add_parser("signals", help="list the signals rules can watch, with their keys and params")

    config = sub.add_parser("config", help="work with agent config files")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    config_check = config_sub.add_parser("check", help="validate an agent config file (and the rules file it "
                                                       "names) as `ksift run --config FILE` would, without root")
    config_check.add_argument("file")

    from ksift.remediation.cli import add_actions_parser

    add_actions_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "alerts":
            return cmd_alerts(args)
        if args.command == "doctor":
            from ksift.cli.doctor import run_doctor

            return run_doctor(sys.stdout)
        if args.command == "dashboard":
            return cmd_dashboard(args)
        if args.command == "actions":
            from ksift.remediation.cli import cmd_actions

            return cmd_actions(args)
        if args.command == "config":
            return cmd_config_check(args)
        if args.command == "rules":
            if args.rules_command == "signals":
                return cmd_rules_signals(args)
            return cmd_rules_check(args)
    except ConfigError as exc:
        print(f"ksift: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KsiftError as exc:
        print(f"ksift: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ksift alerts | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_USAGE


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_inputs(config_path: str | None, rules_path: str | None, db: str | None, api: str | None):
    """(config, rules, store path) as `ksift run` takes them, every check that needs no kernel done:
    `ksift config check` calls this too, so it accepts exactly what `run` accepts."""
    from ksift.config import default_db_path, load_config
    from ksift.rules.parse import load_rules

    config = load_config(config_path)
    if api is not None:
        from ksift.interfaces.settings import apply_api_override

        config = apply_api_override(config, api)
    rules = load_rules(rules_path or config.rules_path)
    # Every path the agent writes is checked now, not after the run (the store is opened after the
    # kernel side is loaded: see compose.py).
    db_path = db or config.db_path or default_db_path()
    _check_store_path(db_path, "--db" if db else config_path, None if db else "store.db")
    return config, rules, db_path


def cmd_run(args: argparse.Namespace) -> int:
    from ksift.compose import running_agent

    for option, value in (("--config", args.config), ("--rules", args.rules), ("--db", args.db),
                          ("--stats", args.stats)):
        non_empty(option, value)
    config, rules, db_path = _run_inputs(args.config, args.rules, args.db, args.api)
    _setup_logging(args.log_level or config.log_level)
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise ConfigError("--for", f"must be a positive, finite number of seconds, got {args.duration}")
    if args.stats:
        from ksift.outfile import check_writable

        check_writable(args.stats, "--stats")
    enabled = rules.enabled()
    log.info("rules from %s: %s", rules.source, ", ".join(r.name for r in enabled) or "none enabled")
    if os.geteuid() != 0:
        log.warning("not running as root: loading BPF needs CAP_BPF and CAP_PERFMON (see `ksift doctor`)")
    try:
        # Everything it builds (kernel side, store, sinks) is released on every way out.
        with running_agent(config, rules, db_path=db_path,
                           json_lines=args.json, stats_path=args.stats) as agent:
            import asyncio  # after the kernel side is loaded (see ksift.compose)

            asyncio.run(agent.run(args.duration))
    except BpfError as exc:
        raise BpfError(f"{exc}\n(run `ksift doctor` to see what this host supports)") from exc
    return EXIT_OK


def _check_store_path(path: str, source: str | None, field: str | None) -> None:
    """Exit 2 now for a store path that is not a regular file (a device such as /dev/null, a folder)."""
    from ksift.outfile import store_path_problem  # not ksift.store.sqlite: sqlite3 loads after the kernel side

    problem = store_path_problem(path)
    if problem is not None:
        raise ConfigError(source or "store", problem, field=field)


def cmd_alerts(args: argparse.Namespace) -> int:
    from ksift.config import default_db_path
    from ksift.sinks.console import format_alert_text
    from ksift.store.sqlite import AlertStore
    from ksift.timeparse import parse_since

    non_empty("--db", args.db)
    since = None
    if args.since is not None:  # "" is a mistake, not "no filter"
        try:
            since = parse_since(args.since, datetime.now(timezone.utc))
        except ValueError as exc:
            raise ConfigError("--since", str(exc)) from exc
    check_limit(args.limit)
    store = AlertStore.open_readonly(args.db or default_db_path())
    try:
        rows = store.list(since=since, rule=args.rule, limit=args.limit)
    finally:
        store.close()
    for alert in rows:
        if args.json:
            print(json.dumps(alert, separators=(",", ":")))
        else:
            print(format_alert_text(alert))
    if not rows and not args.json:
        print("no alerts", file=sys.stderr)
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ksift.config import default_db_path, load_config
    from ksift.interfaces.settings import dashboard_login_url

    non_empty("--config", args.config)
    non_empty("--db", args.db)
    config = load_config(args.config)
    print(dashboard_login_url(config, args.db or config.db_path or default_db_path()))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    non_empty("FILE", args.file)
    config, rules, db_path = _run_inputs(args.file, None, None, None)
    enabled = rules.enabled()
    print(f"{args.file}: ok")
    print(f"  rules: {rules.source}: {len(rules.rules)} rule(s), {len(enabled)} enabled")
    print(f"  store: {db_path}")
    sections = sorted(config.extensions)
    print(f"  sections: {', '.join(sections) if sections else 'none beyond the agent defaults'}")
    return EXIT_OK


def cmd_rules_signals(args: argparse.Namespace) -> int:
    from ksift.rules.model import SIGNALS
    from ksift.units import format_duration

    for spec in SIGNALS.values():
        print(f"{spec.name}: {spec.description}")
        print(f"  key: {' | '.join(spec.keys)}; threshold counts {spec.unit}; decided in {spec.where}")
        for param in spec.params:
            default = format_duration(param.default) if param.kind == "duration" else param.default
            print(f"  params.{param.name} ({param.kind}, default {default}): {param.help}")
    return EXIT_OK


def cmd_rules_check(args: argparse.Namespace) -> int:
    from ksift.rules.parse import load_rules

    rules = load_rules(args.file)
    enabled = rules.enabled()
    print(f"{args.file}: ok, {len(rules.rules)} rule(s), {len(enabled)} enabled")
    for r in rules.rules:
        state = "enabled " if r.enabled else "disabled"
        print(f"  {state} {r.name}: {r.signal} by {r.key} > {r.threshold} in {r.window_s:g}s "
              f"[{r.severity}]")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
