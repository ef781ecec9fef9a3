"""Sessions, roles and CSRF for the web pages and the API, shared by every router."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from central.web.users import role_at_least

COOKIE = "central_session"
IDLE_S = 30 * 60
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


@dataclass
class Session:
    user: str
    role: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # calls this session may play (a reason was given and logged) -> their decoded WAV
    grants: dict[str, Path] = field(default_factory=dict)
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Server-side sessions: the cookie holds only a random token; idle ones expire."""

    def __init__(self) -> None:
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str, role: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._by_token[token] = session = Session(user, role)
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._by_token.get(token)
            if session is None or now - session.seen > IDLE_S:
                self._by_token.pop(token, None)
                return None
            session.seen = now
            return session

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def drop_user(self, user: str) -> None:
        with self._lock:
            self._by_token = {t: s for t, s in self._by_token.items() if s.user != user}


class Denied(Exception):
    """The request is not allowed: not logged in (401) or the wrong role (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def current(request: Request, role: str = "qa") -> Session:
    session: Session | None = request.app.state.sessions.get(request.cookies.get(COOKIE))
    if session is not None and session.user not in request.app.state.users.load():
        request.app.state.sessions.drop_user(session.user)  # removed with: users remove
        session = None
    if session is None:
        raise Denied(401, "log in first (POST /api/login)")
    if not role_at_least(session.role, role):
        raise Denied(403, f"this needs the {role} role; {session.user} is {session.role}")
    return session


async def check_csrf(request: Request, session: Session) -> None:
    """State-changing requests carry the session's CSRF token (form field or X-CSRF-Token)."""
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        sent = str((await request.form()).get("csrf", ""))
    if not sent or not secrets.compare_digest(sent, session.csrf):
        raise Denied(403, "missing or wrong CSRF token (send the session's csrf in the form or "
                          "the X-CSRF-Token header)")


def client_addr(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def render(request: Request, template: str, data: dict[str, Any], status: int = 200) -> Response:
    """The JSON twin under /api/, else the HTML page from the same data."""
    if is_api(request):
        return JSONResponse(data, status_code=status)
    session = request.app.state.sessions.get(request.cookies.get(COOKIE))
    return TEMPLATES.TemplateResponse(request, template, {"data": data, "session": session},
                                      status_code=status)


def denied_response(request: Request, err: Denied) -> Response:
    if is_api(request):
        return JSONResponse({"error": str(err)}, status_code=err.status)
    if err.status == 401:
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
    return render(request, "error.html", {"error": str(err)}, status=err.status)
