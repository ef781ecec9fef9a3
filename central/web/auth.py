"""Routes: log in and out (HTML form and ``POST /api/login``)."""

from __future__ import annotations

import json
import logging
import math

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from central.web import loginlog
from central.web.session import COOKIE, IDLE_S, check_csrf, client_addr, current, render

log = logging.getLogger("central.web.auth")


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == request.headers.get("host")


async def login(request: Request, user: str, password: str) -> tuple[int, dict[str, object], str | None]:
    """Check a login; returns the status, the answer and the new session token."""
    app, addr = request.app, client_addr(request)
    wait = app.state.throttle.wait(user, addr)
    if wait > 0:
        log.warning("login for %r from %s refused: locked for %.0f s", user, addr, wait)
        return 429, {"error": f"too many failed logins: try again in {math.ceil(wait)} s",
                     "retry_after": math.ceil(wait)}, None
    # argon2id takes tens of ms and 64 MiB: off the event loop, so other pages keep answering
    role = await run_in_threadpool(app.state.users.check, user, password)
    if role is None:
        count = app.state.throttle.failed(user, addr)
        log.warning("failed login for %r from %s (%d in a row)", user, addr, count)
        loginlog.append(app.state.home, user=user, action="login-failed", addr=addr,
                         detail=f"{count} failure(s) in a row")
        return 401, {"error": "wrong user name or password"}, None
    app.state.throttle.succeeded(user, addr)
    token, session = app.state.sessions.create(user, role)
    loginlog.append(app.state.home, user=user, action="login", addr=addr)
    return 200, {"user": user, "role": role, "csrf": session.csrf}, token


def _with_cookie(request: Request, response: Response, token: str | None) -> Response:
    if token is not None:
        response.set_cookie(COOKIE, token, max_age=IDLE_S, httponly=True, samesite="strict",
                            secure=request.app.state.tls, path="/")
    return response


async def api_login(request: Request) -> Response:
    if not _same_origin(request):
        return JSONResponse({"error": "cross-origin login refused"}, status_code=403)
    try:
        body = json.loads(await request.body())
        user, password = body["user"], body["password"]
        if not isinstance(user, str) or not isinstance(password, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": 'send JSON {"user": "...", "password": "..."}'}, status_code=400)
    status, answer, token = await login(request, user, password)
    headers = {"Retry-After": str(answer["retry_after"])} if status == 429 else None
    return _with_cookie(request, JSONResponse(answer, status_code=status, headers=headers), token)


async def login_page(request: Request) -> Response:
    if request.method == "GET":
        return render(request, "login.html", {"next": request.query_params.get("next", "/calls")})
    if not _same_origin(request):
        return render(request, "login.html", {"error": "cross-origin login refused", "next": "/calls"}, 403)
    form = await request.form()
    nxt = str(form.get("next", "/calls"))
    status, answer, token = await login(request, str(form.get("user", "")), str(form.get("password", "")))
    if token is None:
        return render(request, "login.html", {"error": answer["error"], "next": nxt}, status)
    target = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/calls"
    return _with_cookie(request, RedirectResponse(target, status_code=303), token)


async def logout(request: Request) -> Response:
    await check_csrf(request, current(request))
    request.app.state.sessions.drop(request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


routes = [
    Route("/api/login", api_login, methods=["POST"]),
    Route("/login", login_page, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
]
