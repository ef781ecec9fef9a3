"""Web users and roles, passwords hashed with argon2id (memory-hard), and failed-login throttling.

Users live in ``<home>/web/users.json`` (mode 0600). Roles are cumulative: ``qa`` searches and
listens; ``auditor`` also exports with proof and reads the access log; ``admin`` also manages
holds and users.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from central.home import Home
from linerec_contract.durable import atomic_write
from linerec_contract.errors import UsageError

ROLES = ("qa", "auditor", "admin")
USERS_FILE = "web/users.json"
_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_HASHER = PasswordHasher()  # argon2id, the library's RFC 9106 low-memory profile (64 MiB)
# Checked against when the user does not exist, so a wrong name costs the same as a wrong password.
_DUMMY = _HASHER.hash("no such user")


def role_at_least(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


class Users:
    def __init__(self, home: Home) -> None:
        self.path = home.root / USERS_FILE
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, str]]:
        if not self.path.is_file():
            return {}
        data: dict[str, dict[str, str]] = json.loads(self.path.read_text())
        return data

    def _save(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Durability: atomic_write fsyncs, so an added user or changed password survives a crash.
        atomic_write(self.path, json.dumps(users, indent=1, sort_keys=True).encode())
        os.chmod(self.path, 0o600)

    def add(self, name: str, role: str, password: str) -> None:
        if not _NAME.match(name):
            raise UsageError(f"user name {name!r} is not valid (lower-case letters, digits, . _ -; "
                             "starting with a letter)")
        if role not in ROLES:
            raise UsageError(f"role {role!r} is not one of {', '.join(ROLES)}")
        check_password(password)
        with self._lock:
            users = self.load()
            if name in users:
                raise UsageError(f"user {name!r} exists (change the password with: users passwd)")
            users[name] = {"role": role, "hash": _HASHER.hash(password)}
            self._save(users)

    def passwd(self, name: str, password: str) -> None:
        check_password(password)
        with self._lock:
            users = self.load()
            if name not in users:
                raise UsageError(f"no user {name!r} (list them with: users ls)")
            users[name]["hash"] = _HASHER.hash(password)
            self._save(users)

    def remove(self, name: str) -> None:
        with self._lock:
            users = self.load()
            if users.pop(name, None) is None:
                raise UsageError(f"no user {name!r} (list them with: users ls)")
            self._save(users)

    def check(self, name: str, password: str) -> str | None:
        """The user's role when the password is right, else None."""
        user = self.load().get(name)
        try:
            _HASHER.verify(user["hash"] if user else _DUMMY, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user["role"] if user else None


def check_password(password: str) -> None:
    if len(password) < 10:
        raise UsageError("the password must have at least 10 characters")
    if len(password) > 1024:
        raise UsageError("the password must have at most 1024 characters")


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


@dataclass
class LoginThrottle:
    """Failed logins slow further attempts, per user name and per client address, separately.

    After ``free`` failures in a row, the n-th failure locks the name (or the address) for
    ``base * 2**(n - free)`` seconds, at most ``cap``. While locked, attempts are refused
    without checking the password. A success clears the name's and the address's count.
    """

    free: int = 3
    base: float = 15.0
    cap: float = 900.0
    clock: object = time.monotonic
    _state: dict[tuple[str, str], _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _now(self) -> float:
        return float(self.clock())  # type: ignore[operator]

    def wait(self, user: str, addr: str) -> float:
        """Seconds before this user or address may try again (0: now)."""
        now = self._now()
        with self._lock:
            return max(0.0, *(f.locked_until - now for f in (
                self._state.get(("user", user), _Failures()),
                self._state.get(("addr", addr), _Failures()))))

    def failed(self, user: str, addr: str) -> int:
        """Record a failure; returns the name's failure count."""
        now = self._now()
        with self._lock:
            if len(self._state) > 100_000:  # bounded memory against a spray of names
                self._state = {k: v for k, v in self._state.items() if v.locked_until > now}
            counts = []
            for key in (("user", user), ("addr", addr)):
                f = self._state.setdefault(key, _Failures())
                f.count += 1
                if f.count >= self.free:
                    f.locked_until = now + min(self.cap, self.base * 2 ** (f.count - self.free))
                counts.append(f.count)
            return counts[0]

    def succeeded(self, user: str, addr: str) -> None:
        with self._lock:
            self._state.pop(("user", user), None)
            self._state.pop(("addr", addr), None)


def users_path(home: Home) -> Path:
    return home.root / USERS_FILE
