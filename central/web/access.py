"""Routes: the access log (auditors and admins)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from central.web import accesslog
from central.web.session import current, render


async def access_log(request: Request) -> Response:
    current(request, "auditor")
    q = request.query_params
    entries = accesslog.read(request.app.state.home, call_id=q.get("call_id") or None,
                             user=q.get("user") or None)
    return render(request, "access.html", {"entries": entries})


routes = [Route("/access-log", access_log), Route("/api/access-log", access_log)]
