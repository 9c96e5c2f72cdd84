"""`ksift actions list|approve ID|reject ID`: remediation decisions from the command line.

The CLI writes answers to the alert store; the running agent picks them up
within its poll_interval. Exit status: 0 done, 1 the decision cannot be
answered (not pending, expired) or the store cannot be used, 2 bad input
(unknown id, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys

from ksift.cli.checks import check_limit, non_empty
from ksift.remediation import STATUSES
from ksift.timeparse import rfc3339

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_actions_parser(sub) -> None:
    actions = sub.add_parser("actions", help="remediation decisions: list them, approve or reject pending ones")
    actions_sub = actions.add_subparsers(dest="actions_command", required=True, metavar="SUBCOMMAND")
    listing = actions_sub.add_parser("list", help="list decisions, newest last")
    listing.add_argument("--db", metavar="PATH", help="SQLite alert store")
    listing.add_argument("--status", choices=STATUSES, help="only decisions in this state")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (newest)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for verb, text in (("approve", "approve a pending action: the agent carries it out"),
                       ("reject", "reject a pending action: nothing is done")):
        cmd = actions_sub.add_parser(verb, help=text)
        cmd.add_argument("id", help="the decision id (see `ksift actions list --status pending`)")
        cmd.add_argument("--db", metavar="PATH", help="SQLite alert store")
        cmd.add_argument("--json", action="store_true", help="print the decision as JSON")


def _who() -> str:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return f"cli ({name}, uid {uid})"


def _line(decision) -> str:
    when = rfc3339(decision.created_unix)
    return f"{decision.id}  {when}  {decision.rule:<16} {decision.mode:<8} {decision.status:<9} {decision.summary()}"


def cmd_actions(args: argparse.Namespace) -> int:
    from ksift.config import default_db_path
    from ksift.remediation.decisions import DecisionError, DecisionStore  # sqlite3: see STATUSES

    non_empty("--db", args.db)
    path = args.db or default_db_path()
    if args.actions_command == "list":
        check_limit(args.limit)
    store = DecisionStore(path)
    try:
        if args.actions_command == "list":
            rows = store.list(status=args.status, limit=args.limit)
            for decision in rows:
                if args.json:
                    print(json.dumps(dict(decision.as_dict(), summary=decision.summary()), separators=(",", ":")))
                else:
                    print(_line(decision))
            if not rows and not args.json:
                print("no decisions" + (f" with status {args.status}" if args.status else ""), file=sys.stderr)
            return EXIT_OK
        try:
            decision = store.answer(args.id, approve=args.actions_command == "approve", by=_who())
        except DecisionError as exc:
            print(f"ksift: error: {exc}", file=sys.stderr)
            return EXIT_USAGE if exc.unknown else EXIT_FAIL
        if args.json:
            print(json.dumps(dict(decision.as_dict(), summary=decision.summary()), separators=(",", ":")))
        else:
            after = "the agent acts on it within its poll interval" if decision.status == "approved" else \
                "nothing will be done"
            print(f"{decision.id}: {decision.status}: {decision.summary()} ({after})")
        return EXIT_OK
    finally:
        store.close()
