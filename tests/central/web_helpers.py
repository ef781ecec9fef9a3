"""A small archive of known audio and web users, for the web tests."""

from __future__ import annotations

import io
import sys

import numpy as np

from central.cli import main
from central.home import Home
from central.receiver import SegmentIntake
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire

from .central_helpers import Box, known_signal

PASSWORDS = {"ann": "qa-password-1", "aud": "auditor-pass-1", "adm": "admin-password-1"}
ROLES = {"ann": "qa", "aud": "auditor", "adm": "admin"}
LATER_NS = 1_800_000_000_000_000_000  # 2027-01-15T08:00Z


def build_archive(home: Home, box: Box) -> np.ndarray:
    """c-long: 3 parts of a known signal on line-1; c-short: 1 part on line-2, years later."""
    signal = known_signal(8000 * 3 + 17)
    segs = box.seal_call("c-long", signal, 3, sensitive={"direction": "outbound",
                                                         "dialled": "5551234"})
    segs += box.seal_call("c-short", known_signal(400, seed=9), 1, line="line-2", start_ns=LATER_NS,
                          sensitive={"direction": "inbound", "caller_id": {"number": "0301234567"}})
    with home.config_path.open("a", encoding="utf-8") as f:
        f.write('\n[lines]\n"box-1/line-1" = "Sales desk"\n"box-1/line-3" = "Claims"\n')
    intake = SegmentIntake(home)
    for seg in segs:
        outcome = intake.handle(segment_topic(seg.device_id, seg.seq), encode_wire(seg))
        assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
    if intake.index is not None:
        intake.index.close()
    return signal


def add_users(home: Home, monkeypatch: object) -> None:
    for name, role in ROLES.items():
        monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORDS[name] + "\n"))  # type: ignore[attr-defined]
        assert main(["--home", str(home.root), "users", "add", name, "--role", role]) == 0
