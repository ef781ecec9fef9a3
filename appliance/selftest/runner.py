"""The catalogue of checks and the runner: :func:`run_selftest` is what ``appliance selftest``
and a remote (fleet) command call; it returns a typed :class:`SelftestResult`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from appliance.config import Config
from appliance.selftest import audio, network, system
from appliance.selftest.context import Context
from appliance.selftest.model import Check, CheckResult, SelftestResult, Verdict
from linerec_contract.errors import ApplianceError, UsageError

log = logging.getLogger(__name__)

CHECKS: tuple[Check, ...] = (
    Check("capture-device", "audio", "capture devices present and matching the config",
          audio.check_capture_device),
    Check("line-signal", "line", "each line carries a signal", audio.check_signal),
    Check("line-noise", "line", "noise floor of each idle line", audio.check_noise),
    Check("line-hum", "line", "50/60 Hz mains hum on each line", audio.check_hum),
    Check("line-dc", "line", "DC offset of each line", audio.check_dc),
    Check("line-clipping", "line", "samples at full scale on each line", audio.check_clipping),
    Check("line-call-level", "line", "speech level during a call", audio.check_call_level),
    Check("loopback", "line", "test tone through the test plug (needs a technician)",
          audio.check_loopback),
    Check("disk-space", "storage", "free space for the journal and the outbox",
          system.check_disk_space),
    Check("disk-latency", "storage", "write + fdatasync latency", system.check_disk_latency),
    Check("journal", "storage", "ring journal integrity", system.check_journal),
    Check("outbox", "storage", "outbox integrity", system.check_outbox),
    Check("data-encryption", "storage", "state folder on an encrypted partition, key in the TPM",
          system.check_encryption),
    Check("clock", "clock", "clock synchronised", system.check_clock),
    Check("dns", "network", "central's name resolves", network.check_dns),
    Check("central-reachable", "network", "central reachable over TCP", network.check_reachable),
    Check("uplink-tls", "network", "TLS handshake with central", network.check_tls),
    Check("uplink-auth", "network", "central accepts the box", network.check_auth),
    Check("watchdog", "board", "hardware watchdog present", system.check_watchdog),
    Check("cpu-temperature", "board", "CPU temperature", system.check_temperature),
    Check("memory", "board", "available memory", system.check_memory),
)

MANUAL_CHECKS = ("loopback",)


def check_names() -> list[str]:
    return [c.name for c in CHECKS]


def select(only: Sequence[str] | None) -> list[Check]:
    """The checks named in ``only`` (all when empty), in catalogue order; UsageError names an
    unknown one and the accepted names."""
    if not only:
        return list(CHECKS)
    unknown = [n for n in only if n not in check_names()]
    if unknown:
        raise UsageError(f"selftest: unknown check {unknown[0]!r} (accepted: "
                         f"{', '.join(check_names())})")
    return [c for c in CHECKS if c.name in only]


def run_checks(ctx: Context, checks: Sequence[Check]) -> list[CheckResult]:
    out: list[CheckResult] = []
    for c in checks:
        try:
            out.extend(c.run(ctx))
        except (ApplianceError, OSError, ValueError) as err:
            log.warning("self-test check %s could not run", c.name, exc_info=True)
            out.append(CheckResult(c.name, "", Verdict.FAIL, None, "", "the check runs to the end",
                                   f"the check could not run: {str(err).splitlines()[0][:160]}"))
    return out


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def run_selftest(cfg: Config, *, only: Sequence[str] | None = None, manual: bool = False,
                 capture_s: float | None = None) -> SelftestResult:
    """Run the checks named in ``only`` (all when None/empty) and return the result.

    Unattended (``manual=False``, e.g. a fleet command) the steps that need a technician's
    hands (the loopback test plug) report SKIP with a hint. UsageError for an unknown name.
    Nothing is stored: see :func:`run_unattended`.
    """
    checks = select(only)
    ctx = Context(cfg, capture_s or cfg.selftest.capture_s, manual=manual)
    started = time.time_ns()
    results = run_checks(ctx, checks)
    return SelftestResult(device_id=cfg.device.id, started_ns=started, finished_ns=time.time_ns(),
                          boot_id=boot_id(), results=tuple(results))


def run_unattended(cfg: Config, *, only: Sequence[str] | None = None) -> SelftestResult:
    """A self-test nobody attends (a remote command from central): the automatic checks, kept
    as the box's last result for ``appliance status`` and central. Recording goes on: while
    capture runs, the line checks read the journal."""
    from appliance.selftest.store import save_last_result

    result = run_selftest(cfg, only=only, manual=False)
    save_last_result(cfg, result)
    return result
