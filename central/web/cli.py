"""``appliance-central web`` and ``appliance-central users``: serve the pages, manage their users."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from central.home import Home
from central.web.users import ROLES, Users
from linerec_contract.errors import ConfigError, UsageError


def add_parsers(sub: Any) -> None:
    """Register ``web`` and ``users`` on central's subcommand parsers (anything with add_parser)."""
    p = sub.add_parser("web", help="serve the web pages for QA and compliance (search, listen, "
                                   "export with proof, access log)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    p.add_argument("--cert", type=Path, help="TLS certificate (PEM); with --key serves HTTPS and "
                                             "marks the session cookie Secure")
    p.add_argument("--key", type=Path, help="TLS private key (PEM)")
    p = sub.add_parser("users", help="manage the web's users: add, ls, remove, passwd")
    usub = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = usub.add_parser("add", help="add a user (password read from stdin)")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=ROLES)
    q = usub.add_parser("ls", help="list users and roles")
    q.add_argument("--json", action="store_true")
    q = usub.add_parser("remove", help="remove a user")
    q.add_argument("name")
    q = usub.add_parser("passwd", help="set a user's password (read from stdin)")
    q.add_argument("name")


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080; port 0..65535)")
    return host.strip("[]"), int(port)


def cmd_web(home: Home, args: argparse.Namespace) -> int:
    from central.web.app import run

    host, port = _listen(args.listen)
    if (args.cert is None) != (args.key is None):
        raise UsageError("give both --cert and --key for HTTPS, or neither")
    for name in ("cert", "key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{name} file {path} does not exist (a PEM file)")
    if not Users(home).load():
        print("note: no web users yet; add one with: appliance-central users add NAME --role admin",
              file=sys.stderr)
    run(home, host, port, args.cert, args.key)
    return 0


def _password() -> str:
    line = sys.stdin.readline()
    if not line:
        raise UsageError("no password on stdin (pipe it, or type it and press Enter)")
    return line.rstrip("\r\n")


def cmd_users(home: Home, args: argparse.Namespace) -> int:
    users = Users(home)
    action = args.users_command
    if action == "add":
        home.require_writable()
        users.add(args.name, args.role, _password())
        print(f"added {args.name} ({args.role})")
    elif action == "passwd":
        home.require_writable()
        users.passwd(args.name, _password())
        print(f"password of {args.name} changed")
    elif action == "remove":
        home.require_writable()
        users.remove(args.name)
        print(f"removed {args.name}")
    else:
        listing = [{"name": n, "role": u["role"]} for n, u in sorted(users.load().items())]
        if args.json:
            print(json.dumps(listing, indent=1))
        else:
            for entry in listing:
                print(f"{entry['name']}  {entry['role']}")
    return 0
