"""``appliance selftest``: run the checks, print them for people (or JSON), keep the result,
and walk the technician through the steps that need their hands.

Exit codes: 0 the run is complete and nothing failed; 1 a check failed, or the session waits
for the technician (resume with ``--continue``); 2 bad usage.
"""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET  # noqa: S405 - we only write XML
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from appliance.config import Config
from appliance.selftest import audio, store
from appliance.selftest.context import Context
from appliance.selftest.model import SelftestResult, Verdict
from appliance.selftest.runner import MANUAL_CHECKS, boot_id, run_checks, select
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ApplianceError, UsageError


def selftest_command(cfg: Config, *, only: Sequence[str] | None, as_json: bool,
                     junit: Path | None, resume: bool, prompt: bool | None = None) -> int:
    """Start a self-test (or resume the waiting one with ``resume``) and report it."""
    interactive = (sys.stdin.isatty() and sys.stdout.isatty() and not as_json) if prompt is None \
        else prompt
    if junit is not None and not junit.parent.is_dir():
        raise UsageError(f"selftest: --junit {junit}: folder {junit.parent} does not exist "
                         "(accepted: a file in an existing folder)")
    if resume:
        if only:
            raise UsageError("selftest: --continue resumes the waiting session as it was started; "
                             "drop --only")
        session = store.load_session(cfg)
        if session is None:
            raise UsageError("selftest: --continue: no self-test session is waiting "
                             "(start one with 'appliance selftest')")
    else:
        session = _start(cfg, only, as_json=as_json)
    ctx = Context(cfg, cfg.selftest.capture_s, manual=True)
    while not session.done:
        if not resume:
            instruction = session.instruction()
            if not interactive or not _ask(instruction):
                return _report(cfg, session, junit, as_json=as_json, waiting=instruction)
        resume = False
        ctx.loopback_line = session.steps[session.next_step]
        ctx.forget_takes()
        session.results.extend(run_checks(ctx, [c for c in select(["loopback"])]))
        session.next_step += 1
        session.boot_ids.append(boot_id())
        store.save_session(cfg, session)
        if not as_json:
            for r in session.results[-1:]:
                print(_row(r.verdict, r.name, r.shown_value(), r.hint))
    return _report(cfg, session, junit, as_json=as_json, waiting="")


def _start(cfg: Config, only: Sequence[str] | None, *, as_json: bool) -> store.Session:
    checks = select(only)
    if not as_json:
        print(f"appliance selftest: {len(checks)} check(s), about {cfg.selftest.capture_s:.0f} s of "
              "audio per stream ...", flush=True)
    ctx = Context(cfg, cfg.selftest.capture_s, manual=True)
    auto = [c for c in checks if c.name not in MANUAL_CHECKS]
    session = store.Session(started_ns=time.time_ns(), only=list(only or []), steps=[],
                            boot_ids=[boot_id()])
    session.results = run_checks(ctx, auto)
    if any(c.name == "loopback" for c in checks):
        if cfg.selftest.playback_device and audio.loopback_lines(ctx):
            session.steps = audio.loopback_lines(ctx)
        else:
            session.results.extend(run_checks(ctx, select(["loopback"])))
    if not as_json:
        for r in session.results:
            print(_row(r.verdict, r.name, r.shown_value(), r.hint))
    if session.steps:
        store.save_session(cfg, session)  # replaces a session left waiting, if any
    return session


def _ask(instruction: str) -> bool:
    try:
        input(f"\n>>> {instruction}, then press Enter (Ctrl-C to stop; "
              "resume later with 'appliance selftest --continue'): ")
    except (EOFError, KeyboardInterrupt):
        print()
        return False
    return True


def _report(cfg: Config, session: store.Session, junit: Path | None, *, as_json: bool,
            waiting: str) -> int:
    result = SelftestResult(device_id=cfg.device.id, started_ns=session.started_ns,
                            finished_ns=time.time_ns(), boot_id=boot_id(),
                            results=tuple(session.results), complete=not waiting,
                            waiting_for=waiting)
    kept = ""
    try:
        kept = str(store.save_last_result(cfg, result))
        if session.steps and not waiting:
            store.end_session(cfg)
    except OSError as err:
        print(f"appliance selftest: warning: the result cannot be kept under "
              f"{store.selftest_dir(cfg)}: {err.strerror}", file=sys.stderr)
    if junit is not None:
        write_junit(junit, result)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print_summary(result, kept, sys.stdout)
    return result.exit_code


VERDICT_MARK = {Verdict.PASS: "PASS", Verdict.WARN: "WARN", Verdict.FAIL: "FAIL", Verdict.SKIP: "skip"}


def _row(verdict: Verdict, name: str, value: str, hint: str) -> str:
    row = f"{VERDICT_MARK[verdict]:<5} {name:<34.34} {value:<20.20}".rstrip()
    return row + (f"\n      -> {hint}" if hint and verdict is not Verdict.PASS else "")


def print_summary(result: SelftestResult, kept: str, out: TextIO) -> None:
    c = result.counts()
    tally = ", ".join(f"{c[v.value]} {v.value}" for v in Verdict if c[v.value])
    print("", file=out)
    if not result.complete:
        print(f"WAITING: {result.waiting_for}, then run 'appliance selftest --continue'", file=out)
        print(f"selftest so far: {result.verdict.value} ({tally})", file=out)
    else:
        print(f"selftest: {result.verdict.value} ({tally})", file=out)
    if kept:
        print(f"result kept in {kept}", file=out)


def write_junit(path: Path, result: SelftestResult) -> None:
    """The result as JUnit XML (one testcase per check and subject) for test dashboards."""
    c = result.counts()
    suite = ET.Element("testsuite", name="appliance selftest", tests=str(len(result.results)),
                       failures=str(c["FAIL"]), skipped=str(c["SKIP"]), errors="0",
                       timestamp=time.strftime("%Y-%m-%dT%H:%M:%S",
                                               time.gmtime(result.started_ns / 1e9)),
                       time=f"{(result.finished_ns - result.started_ns) / 1e9:.3f}")
    for r in result.results:
        case = ET.SubElement(suite, "testcase", classname=f"selftest.{r.check}", name=r.name)
        message = f"{r.shown_value()}: {r.hint}" if r.hint else r.shown_value()
        if r.verdict is Verdict.FAIL:
            ET.SubElement(case, "failure", message=message, type="FAIL").text = r.detail or r.limits
        elif r.verdict is Verdict.SKIP:
            ET.SubElement(case, "skipped", message=message)
        out = ET.SubElement(case, "system-out")
        out.text = f"{r.verdict.value} value={r.shown_value()} limits: {r.limits}" + (
            f"\nhint: {r.hint}" if r.hint else "")
    data = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    try:
        atomic_write(path, data + b"\n")
    except OSError as err:
        raise ApplianceError(f"selftest: --junit {path}: cannot write ({err.strerror})") from err
