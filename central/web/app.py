"""The web application: routers, error handling, security headers; ``run`` serves it on uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from central.home import Home
from central.web import access, archive, auth, calls, holds
from central.web.session import Denied, Sessions, denied_response, is_api, render
from central.web.users import LoginThrottle, Users
from linerec_contract.errors import ApplianceError

log = logging.getLogger("central.web")
# No script or style from anywhere but this server; the pages need no JavaScript at all.
CSP = ("default-src 'none'; style-src 'self' 'unsafe-inline'; media-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"same-origin"),
                            (b"x-frame-options", b"DENY")]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _denied(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Denied)  # noqa: S101 - registered for Denied only
    return denied_response(request, exc)


async def _bad_input(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApplianceError)  # noqa: S101 - registered for ApplianceError only
    status = 400 if exc.exit_code == 2 else 409
    if is_api(request):
        return JSONResponse({"error": str(exc)}, status_code=status)
    return render(request, "error.html", {"error": str(exc)}, status)


def create_app(home: Home, *, tls: bool = False) -> Starlette:
    app = Starlette(routes=[*auth.routes, *calls.routes, *access.routes, *holds.routes],
                    middleware=[Middleware(SecurityHeaders)],
                    exception_handlers={Denied: _denied, ApplianceError: _bad_input})
    archive.sweep_cache(home, 0)  # no decoded audio survives a restart
    app.state.home = home
    app.state.tls = tls
    app.state.users = Users(home)
    app.state.sessions = Sessions()
    app.state.throttle = LoginThrottle()
    return app


def run(home: Home, host: str, port: int, cert: Path | None, key: Path | None) -> None:
    import uvicorn

    app = create_app(home, tls=cert is not None)
    uvicorn.run(app, host=host, port=port, ssl_certfile=str(cert) if cert else None,
                ssl_keyfile=str(key) if key else None, log_level="info", server_header=False)
