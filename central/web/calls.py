"""Routes: search calls, one call, its audio (with Range), listen and download with a reason."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from central import accesslog, export, holds, search
from central.web import archive
from central.web.session import Denied, Session, check_csrf, client_addr, current, is_api, render
from linerec_contract.errors import UsageError

log = logging.getLogger("central.web.audio")


def search_view(request: Request) -> dict[str, Any]:
    given, flt = archive.parse_filter(request.query_params)
    return {"filters": given, "calls": archive.list_calls(request.app.state.home, flt)}


async def search_page(request: Request) -> Response:
    current(request)
    try:
        return render(request, "calls.html", await run_in_threadpool(search_view, request))
    except UsageError as err:
        return render(request, "calls.html", {"filters": {}, "calls": [], "error": str(err)}, 400)


async def _detail(request: Request) -> dict[str, Any]:
    detail = await run_in_threadpool(archive.call_detail, request.app.state.home,
                                     request.path_params["call_id"])
    if detail is None:
        raise Denied(404, f"no call {request.path_params['call_id']!r} (search with GET /api/calls)")
    return detail


async def call_page(request: Request) -> Response:
    session = current(request)
    detail = await _detail(request)
    detail["may_play"] = detail["call_id"] in session.grants
    detail.update(await run_in_threadpool(_holds_and_access, request.app.state.home,
                                          detail["call_id"], session.role != "qa"))
    return render(request, "call.html", detail)


def _holds_and_access(home: Any, call_id: str, with_access: bool) -> dict[str, Any]:
    """The holds covering the call and (for auditors) its last 20 accesses, newest first."""
    record = search.find_call(home, call_id)
    access = [vars(e) for e in accesslog.entries(home) if e.call_id == call_id][::-1][:20]
    return {"holds": [vars(h) | {"what": h.describe()} for h in holds.list_holds(home)
                      if h.covers(record)],
            "access": access if with_access else []}


async def _reason(request: Request) -> str:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            value = json.loads(await request.body()).get("reason", "")
        except (ValueError, AttributeError):
            value = ""
    else:
        value = (await request.form()).get("reason", "")
    reason = str(value).strip()
    if not 3 <= len(reason) <= 500:
        raise UsageError("give a reason for this access (3 to 500 characters)")
    return reason


def _log(request: Request, session: Session, action: str, detail: dict[str, Any], reason: str) -> None:
    """Into the archive's access log (central.accesslog), before anything is handed out."""
    accesslog.record(request.app.state.home, action=action, device=detail["device"],
                     call_id=detail["call_id"], reason=reason, user=session.user,
                     detail=f"web page, from {client_addr(request)}")


async def listen(request: Request) -> Response:
    """Grant this session playback of the call, after logging who, when and why."""
    session = current(request)
    await check_csrf(request, session)
    detail = await _detail(request)
    try:
        reason = await _reason(request)
    except UsageError as err:
        detail["error"] = str(err)
        return render(request, "call.html", detail, 400)
    _log(request, session, "play", detail, reason)
    # Decoded (and verified) once here, so the player's many Range requests only read the file.
    session.grants[detail["call_id"]] = await run_in_threadpool(
        archive.cached_wav, request.app.state.home, detail["call_id"])
    if is_api(request):
        return render(request, "call.html", {"audio": f"/api/calls/{detail['call_id']}/audio"})
    return RedirectResponse(f"/calls/{detail['call_id']}#player", status_code=303)


async def audio(request: Request) -> Response:
    """The call as WAV PCM 16-bit; answers Range requests with 206 so players can seek."""
    session = current(request)
    call_id = request.path_params["call_id"]
    path = session.grants.get(call_id)
    if path is None:
        raise Denied(403, f"give a reason first: POST /api/calls/{call_id}/listen")
    if not path.is_file():  # the cache was cleared meanwhile
        path = session.grants[call_id] = await run_in_threadpool(
            archive.cached_wav, request.app.state.home, call_id)
    return _LoggedFile(path, media_type="audio/wav", headers={"Cache-Control": "private, no-store"},
                       what=f"audio of call {call_id} to {session.user}",
                       asked=request.headers.get("range"))


class _LoggedFile(FileResponse):
    """A FileResponse (Range aware) that logs what it answered: status and byte range."""

    def __init__(self, path: Any, *, what: str, asked: str | None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.what, self.asked = what, asked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                log.info("served %s: %d (range %s, content-range %s)", self.what, message["status"],
                         self.asked or "none", headers.get(b"content-range", b"none").decode())
            await send(message)

        await super().__call__(scope, receive, logged)


async def download(request: Request) -> Response:
    """The call's WAV with its verification file, in one zip; auditors only, with a reason."""
    session = current(request, "auditor")
    await check_csrf(request, session)
    detail = await _detail(request)
    try:
        reason = await _reason(request)
    except UsageError as err:
        detail["error"] = str(err)
        return render(request, "call.html", detail, 400)
    name = detail["call_id"]
    # The archive's export with proof (logged in the access log as an export by this user),
    # into a private temporary folder, then handed over as one zip.
    with tempfile.TemporaryDirectory(prefix="web-download-") as folder:
        out = Path(folder) / f"{name}.wav"
        result = await run_in_threadpool(lambda: export.export_call(
            request.app.state.home, name, out, reason=reason, device=detail["device"],
            user=session.user))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for path in (result.audio_path, result.proof_path, result.summary_path):
                z.write(path, path.name)
    return Response(buf.getvalue(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{name}.zip"', "Cache-Control": "no-store"})


routes = [
    Route("/", lambda request: RedirectResponse("/calls", status_code=303)),
    Route("/calls", search_page),
    Route("/api/calls", search_page),
    Route("/calls/{call_id}", call_page),
    Route("/api/calls/{call_id}", call_page),
    Route("/calls/{call_id}/listen", listen, methods=["POST"]),
    Route("/api/calls/{call_id}/listen", listen, methods=["POST"]),
    Route("/api/calls/{call_id}/audio", audio),
    Route("/calls/{call_id}/download", download, methods=["POST"]),
    Route("/api/calls/{call_id}/download", download, methods=["POST"]),
]
