"""Routes: search calls, one call, its audio (with Range), listen and download with a reason."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from central.web import accesslog, archive
from central.web.session import Denied, Session, check_csrf, client_addr, current, is_api, render
from linerec_contract.errors import UsageError

log = logging.getLogger("central.web.audio")


def _version() -> str:
    try:
        return version("line-recorder")
    except PackageNotFoundError:
        return "unknown"


def search_view(request: Request) -> dict[str, Any]:
    given, flt = archive.parse_filter(request.query_params)
    return {"filters": given, "calls": archive.list_calls(request.app.state.home, flt)}


async def search(request: Request) -> Response:
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
    detail["access"] = accesslog.read(request.app.state.home, call_id=detail["call_id"])[:20] \
        if session.role != "qa" else []
    return render(request, "call.html", detail)


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
    accesslog.append(request.app.state.home, user=session.user, action=action,
                     call_id=detail["call_id"], device=detail["device"], reason=reason,
                     addr=client_addr(request))


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
    _log(request, session, "listen", detail, reason)
    session.grants.add(detail["call_id"])
    if is_api(request):
        return render(request, "call.html", {"audio": f"/api/calls/{detail['call_id']}/audio"})
    return RedirectResponse(f"/calls/{detail['call_id']}#player", status_code=303)


async def audio(request: Request) -> Response:
    """The call as WAV PCM 16-bit; answers Range requests with 206 so players can seek."""
    session = current(request)
    call_id = request.path_params["call_id"]
    if call_id not in session.grants:
        raise Denied(403, f"give a reason first: POST /api/calls/{call_id}/listen")
    path = await run_in_threadpool(archive.cached_wav, request.app.state.home, call_id)
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
    pcm, rate, _parts = await run_in_threadpool(archive.call_pcm, request.app.state.home,
                                                detail["call_id"])
    wav = archive.wav_bytes(pcm, rate)
    proof = archive.verification_file(detail, wav, _version())
    _log(request, session, "download", detail, reason)
    buf = io.BytesIO()
    name = detail["call_id"]
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}.wav", wav)
        z.writestr(f"{name}.verification.json", proof)
    return Response(buf.getvalue(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{name}.zip"', "Cache-Control": "no-store"})


routes = [
    Route("/", lambda request: RedirectResponse("/calls", status_code=303)),
    Route("/calls", search),
    Route("/api/calls", search),
    Route("/calls/{call_id}", call_page),
    Route("/api/calls/{call_id}", call_page),
    Route("/calls/{call_id}/listen", listen, methods=["POST"]),
    Route("/api/calls/{call_id}/listen", listen, methods=["POST"]),
    Route("/api/calls/{call_id}/audio", audio),
    Route("/calls/{call_id}/download", download, methods=["POST"]),
    Route("/api/calls/{call_id}/download", download, methods=["POST"]),
]
