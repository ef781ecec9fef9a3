"""Routes: the access log (auditors and admins)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from central import accesslog
from central.web import loginlog
from central.web.session import current, render


async def access_log(request: Request) -> Response:
    current(request, "auditor")
    q = request.query_params
    home = request.app.state.home
    call_id, user = q.get("call_id") or None, q.get("user") or None
    entries = [vars(e) for e in accesslog.entries(home)
               if call_id in (None, e.call_id) and user in (None, e.user)][::-1]
    problems = [f"line {p.line}: {p.detail}" for p in accesslog.verify(home)]
    logins = loginlog.read(home, user=user)[:200]
    return render(request, "access.html", {"entries": entries, "problems": problems,
                                           "logins": logins})


routes = [Route("/access-log", access_log), Route("/api/access-log", access_log)]
