"""Routes: legal holds (issue 13's holds service): auditors read them, admins add and lift them."""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from central import holds
from central.web.archive import parse_time
from central.web.session import check_csrf, current, is_api, render


def _view(request: Request) -> dict[str, Any]:
    return {"holds": [vars(h) | {"what": h.describe()} for h in holds.list_holds(request.app.state.home)]}


async def _fields(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return {}
        return {k: str(v) for k, v in body.items() if v is not None}
    return {k: str(v) for k, v in (await request.form()).items()}


async def holds_page(request: Request) -> Response:
    current(request, "auditor")
    return render(request, "holds.html", await run_in_threadpool(_view, request))


async def add(request: Request) -> Response:
    session = current(request, "admin")
    await check_csrf(request, session)
    f = await _fields(request)
    hold = await run_in_threadpool(lambda: holds.add_hold(
        request.app.state.home, reason=f.get("reason", ""), call_id=f.get("call") or None,
        device=f.get("device") or None,
        since_ns=parse_time("since", f["since"]) if f.get("since") else None,
        until_ns=parse_time("until", f["until"]) if f.get("until") else None, user=session.user))
    if is_api(request):
        return render(request, "holds.html", vars(hold) | {"what": hold.describe()})
    return RedirectResponse("/holds", status_code=303)


async def remove(request: Request) -> Response:
    session = current(request, "admin")
    await check_csrf(request, session)
    f = await _fields(request)
    hold = await run_in_threadpool(lambda: holds.remove_hold(
        request.app.state.home, request.path_params["hold_id"], reason=f.get("reason", ""),
        user=session.user))
    if is_api(request):
        return render(request, "holds.html", vars(hold) | {"what": hold.describe(), "removed": True})
    return RedirectResponse("/holds", status_code=303)


routes = [
    Route("/holds", holds_page), Route("/api/holds", holds_page),
    Route("/holds", add, methods=["POST"]), Route("/api/holds", add, methods=["POST"]),
    Route("/holds/{hold_id}/remove", remove, methods=["POST"]),
    Route("/api/holds/{hold_id}/remove", remove, methods=["POST"]),
]
