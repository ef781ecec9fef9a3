"""Storage, clock and board checks: free space, write+fsync latency, journal and outbox
integrity, clock synchronisation, watchdog, CPU temperature, memory.

Limits and where they come from (hw-tests/CHECKS.md is the technician's copy):

- disk space: the outbox must hold a network outage. At 8 kHz x 16 bit a line records at most
  57.6 MB an hour before compression; below 1 GiB free a week-end outage of a busy box no
  longer fits (WARN below 2 GiB or 10 %), below 256 MiB recording will soon stop (FAIL).
- write+fsync latency: the journal promises to lose at most ``ring.sync_interval_ms`` on a
  power cut; an fdatasync slower than that breaks the promise (FAIL), one slower than a fifth of
  it leaves no margin for a busy moment (WARN). Measured as the slowest of 20 4-KiB writes.
- clock: adjtimex(2) says whether the kernel clock is disciplined (NTP/PTP); an undisciplined
  clock puts wrong times on recordings (FAIL); a maximum error above 100 ms is WARN (call times
  are kept to the millisecond, and a recording stamped 100 ms off no longer lines up with the
  phone system's records).
- CPU temperature: most embedded SoCs throttle at 80-85 degC (Raspberry Pi firmware at 80);
  WARN from 70, FAIL from 85.
- memory: the recorder needs about 100 MiB; WARN below 200 MiB available, FAIL below 64 MiB.
- data encryption: a stolen box or disk must not give up recordings and keys. PASS when the
  state folder lies on a LUKS2 volume whose key the TPM holds (the image's data-unlock records
  how it opened the partition in ``/run/appliance-data/state``); WARN when it is not encrypted
  or its key is kept beside it (no TPM).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from pathlib import Path

from appliance.buffer.check import check_live as check_journal_file
from appliance.selftest.context import Context
from appliance.selftest.model import CheckResult, Verdict, grade
from linerec_contract.durable import ensure_dir
from linerec_contract.errors import ApplianceError, FormatError

MIB = 1024 * 1024
DISK_FAIL_BYTES = 256 * MIB
DISK_WARN_BYTES = 2048 * MIB
DISK_WARN_FRACTION = 0.10
FSYNC_SAMPLES = 20
CLOCK_WARN_MS = 100.0
TEMP_WARN_C = 70.0
TEMP_FAIL_C = 85.0
MEM_WARN_BYTES = 200 * MIB
MEM_FAIL_BYTES = 64 * MIB
WATCHDOG_PATHS = ("/dev/watchdog", "/dev/watchdog0")
SYS_DEV_BLOCK = Path("/sys/dev/block")
DATA_UNLOCK_STATE = Path("/run/appliance-data/state")
UNLOCK_HINTS = {
    "esp-key": "no TPM: the key is kept on the ESP, so the disk alone opens the partition; use a "
               "board with a TPM 2.0 where recordings must survive theft",
    "recovery": "the TPM took no key after the recovery: the recovery key is asked at every "
                "boot; check the TPM in the firmware setup",
}


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(ctx: Context) -> list[CheckResult]:
    folder = _existing(ctx.cfg.state_dir)
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    share = free / total if total else 0.0
    limits = (f"FAIL < {DISK_FAIL_BYTES // MIB} MiB, WARN < {DISK_WARN_BYTES // MIB} MiB or "
              f"< {DISK_WARN_FRACTION:.0%} free")
    verdict = (Verdict.FAIL if free < DISK_FAIL_BYTES else
               Verdict.WARN if free < DISK_WARN_BYTES or share < DISK_WARN_FRACTION else Verdict.PASS)
    hint = "" if verdict is Verdict.PASS else (
        f"little free space under {folder}: remove files that do not belong to the recorder, or "
        "fit larger storage; check the outbox backlog with 'appliance status'")
    return [CheckResult("disk-space", str(ctx.cfg.state_dir), verdict, round(free / MIB, 1), "MiB",
                        limits, hint, f"{share:.1%} of {total / MIB:.0f} MiB free on {folder}")]


def check_disk_latency(ctx: Context) -> list[CheckResult]:
    sync_ms = float(ctx.cfg.ring.sync_interval_ms)
    limits = (f"slowest write+fdatasync: FAIL >= {sync_ms:.0f} ms (ring.sync_interval_ms), "
              f"WARN >= {sync_ms / 5:.0f} ms")
    folder = ctx.cfg.state_dir
    try:
        ensure_dir(folder)  # the box's own folder: the self-test keeps its result there too
    except OSError as err:
        return [CheckResult("disk-latency", str(folder), Verdict.FAIL, None, "ms", limits,
                            f"cannot create the state folder {folder}: check paths.state_dir, its "
                            "permissions and that the storage is mounted", str(err.strerror))]
    path = folder / f".selftest-latency-{os.getpid()}"
    block = os.urandom(4096)
    times: list[float] = []
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for i in range(FSYNC_SAMPLES):
                t0 = time.perf_counter()
                os.pwrite(fd, block, i * 4096)
                os.fdatasync(fd)  # the journal's own durability step, measured
                times.append((time.perf_counter() - t0) * 1000.0)
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as err:
        return [CheckResult("disk-latency", str(folder), Verdict.FAIL, None, "ms", limits,
                            f"cannot write to {folder}: check the storage is mounted read-write "
                            "and not full", f"{err.strerror}")]
    worst = max(times)
    verdict = grade(worst, warn=sync_ms / 5, fail=sync_ms)
    hint = "" if verdict is Verdict.PASS else (
        "slow storage: use an industrial SD card or eMMC/SSD; a worn card is slow before it fails")
    times.sort()
    return [CheckResult("disk-latency", str(folder), verdict, round(worst, 2), "ms", limits, hint,
                        f"median {times[len(times) // 2]:.2f} ms over {FSYNC_SAMPLES} writes")]


def check_journal(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    limits = "a full scan finds no corrupt slot and no missing sequence range"
    for s in ctx.cfg.capture:
        path = ctx.cfg.ring_path(s.name)
        if not path.exists():
            out.append(CheckResult("journal", s.name, Verdict.SKIP, None, "", limits,
                                   "no journal yet: the box has not recorded on this stream"))
            continue
        try:
            rep = check_journal_file(path)
        except (FormatError, OSError) as err:
            out.append(CheckResult("journal", s.name, Verdict.FAIL, None, "", limits,
                                   f"journal {path} is unreadable: stop the box, keep the file for "
                                   "support and let 'appliance run' make a new one", str(err)))
            continue
        verdict = Verdict.PASS if rep.ok else Verdict.FAIL
        hint = "" if rep.ok else (f"journal {path} has damage: run 'appliance buffer check {path}' "
                                  "and check the storage (disk-latency, dmesg for I/O errors)")
        out.append(CheckResult("journal", s.name, verdict, rep.records, "records", limits, hint,
                               "; ".join(rep.problems)))
    return out


def check_outbox(ctx: Context) -> list[CheckResult]:
    from appliance.sync.outbox import Outbox
    from linerec_contract.segment import decode_wire

    limits = "every pending segment has its SHA-256 sidecar and it matches the file"
    folder = ctx.cfg.outbox_dir
    if not folder.is_dir():
        return [CheckResult("outbox", str(folder), Verdict.SKIP, None, "", limits,
                            "no outbox yet: the box has not sealed a segment")]
    try:
        box = Outbox(folder)
        pending = box.pending()
        bad: list[str] = []
        for seq in pending:
            try:
                want = box.sha256_of(seq)
                blob = box.read(seq)
            except FileNotFoundError:
                continue  # acknowledged (and removed) by the uplink while we looked
            except FormatError as err:
                bad.append(f"{seq}: {err}")
                continue
            try:
                got = decode_wire(blob).payload_sha256
            except FormatError as err:
                bad.append(f"{seq}: {err}")
                continue
            if got != want:
                bad.append(f"{seq}: payload SHA-256 {got[:12]}... differs from its sidecar")
    except (ApplianceError, OSError) as err:
        return [CheckResult("outbox", str(folder), Verdict.FAIL, None, "", limits,
                            f"outbox {folder} cannot be read: check permissions and the storage",
                            str(err))]
    verdict = Verdict.FAIL if bad else Verdict.PASS
    hint = "" if not bad else ("damaged segments in the outbox: keep them for support and check the "
                               "storage (disk-latency, dmesg for I/O errors)")
    return [CheckResult("outbox", str(folder), verdict, len(pending), "segments", limits, hint,
                        "; ".join(bad[:5]))]


class _Timex(ctypes.Structure):
    _fields_ = [  # struct timex, linux/timex.h
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


STA_UNSYNC = 0x0040
TIME_ERROR = 5


def read_clock_state() -> tuple[int, int, int] | None:
    """(adjtimex state, status bits, maxerror in microseconds), or None where unavailable."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    tx = _Timex()
    tx.modes = 0  # read only: needs no privilege
    state = int(libc.adjtimex(ctypes.byref(tx)))
    if state < 0:
        return None
    return state, int(tx.status), int(tx.maxerror)


def check_clock(ctx: Context) -> list[CheckResult]:
    limits = f"kernel clock disciplined (adjtimex), maximum error < {CLOCK_WARN_MS:.0f} ms"
    got = read_clock_state()
    if got is None:
        return [CheckResult("clock", "", Verdict.SKIP, None, "", limits,
                            "the clock state cannot be read here: check 'timedatectl' by hand")]
    state, status, maxerror_us = got
    ms = maxerror_us / 1000.0
    if state == TIME_ERROR or status & STA_UNSYNC:
        return [CheckResult("clock", "", Verdict.FAIL, "unsynchronised", "", limits,
                            "the clock is not synchronised: enable NTP ('timedatectl set-ntp true') "
                            "and allow UDP port 123 to the time server",
                            f"adjtimex state {state}, status 0x{status:x}")]
    verdict = Verdict.WARN if ms >= CLOCK_WARN_MS else Verdict.PASS
    hint = "" if verdict is Verdict.PASS else "the clock's error bound is large: check the time server"
    return [CheckResult("clock", "", verdict, round(ms, 1), "ms", limits, hint,
                        f"adjtimex state {state}, maximum error {ms:.1f} ms")]


def check_encryption(ctx: Context) -> list[CheckResult]:
    limits = "the state folder on a LUKS2 volume whose key the TPM holds"
    folder = _existing(ctx.cfg.state_dir)
    dev = os.stat(folder).st_dev
    try:
        uuid = (SYS_DEV_BLOCK / f"{os.major(dev)}:{os.minor(dev)}" / "dm" / "uuid").read_text().strip()
    except OSError:
        uuid = ""
    if not uuid.startswith("CRYPT-LUKS"):
        return [CheckResult("data-encryption", "", Verdict.WARN, "none", "",
                            limits, f"{folder} is not on an encrypted volume: a stolen disk gives up "
                            "recordings and keys (the box's image encrypts its data partition)")]
    state: dict[str, str] = {}
    try:
        for row in DATA_UNLOCK_STATE.read_text().splitlines():
            key, _, value = row.partition("=")
            state[key.strip()] = value.strip()
    except OSError:
        # No record: the volume was not opened by the image's data-unlock (named in the detail).
        state = {}
    kind = uuid.split("-")[1]
    unlock = state.get("unlock", "")
    detail = f"{kind}, opened by {unlock}" if unlock else f"{kind} (no record of how it was opened)"
    if unlock in UNLOCK_HINTS:
        hint = UNLOCK_HINTS[unlock]
        if state.get("tpm") == "unbound":
            # The firmware describes a TPM, but the running kernel has no driver for it.
            hint = (f"the firmware declares a TPM ({state.get('tpm_declared') or 'unnamed'}) but "
                    "the kernel bound no driver to it, so it holds no key: load its driver "
                    "(tpm_tis_spi, tpm_tis_i2c, ...) or update the kernel, then recover the "
                    "partition onto it (os-image/README.md, 'Recovery')")
        return [CheckResult("data-encryption", "", Verdict.WARN, unlock, "", limits, hint, detail)]
    return [CheckResult("data-encryption", "", Verdict.PASS, unlock or kind, "",
                        limits, "", detail)]


def check_watchdog(ctx: Context) -> list[CheckResult]:
    limits = "a hardware watchdog device exists (" + " or ".join(WATCHDOG_PATHS) + ")"
    found = [p for p in WATCHDOG_PATHS if Path(p).exists()]
    if found:
        return [CheckResult("watchdog", "", Verdict.PASS, found[0], "", limits, "")]
    return [CheckResult("watchdog", "", Verdict.WARN, "none", "", limits,
                        "no watchdog device: a hung box will not restart itself; enable the SoC's "
                        "watchdog driver in the image (or 'modprobe softdog' as a stopgap)")]


def check_temperature(ctx: Context) -> list[CheckResult]:
    limits = f"WARN >= {TEMP_WARN_C:.0f} degC, FAIL >= {TEMP_FAIL_C:.0f} degC"
    temps: list[tuple[float, str]] = []
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            temps.append((int((zone / "temp").read_text().strip()) / 1000.0,
                          (zone / "type").read_text().strip()))
        except (OSError, ValueError):
            continue
    if not temps:
        return [CheckResult("cpu-temperature", "", Verdict.SKIP, None, "degC", limits,
                            "no temperature sensor exposed (a virtual machine?): feel the case; "
                            "keep the vents free")]
    hottest, kind = max(temps)
    verdict = grade(hottest, warn=TEMP_WARN_C, fail=TEMP_FAIL_C)
    hint = "" if verdict is Verdict.PASS else (
        "the box runs hot: give it air (no closed cabinet, vents free) or fit a heat sink")
    return [CheckResult("cpu-temperature", "", verdict, round(hottest, 1), "degC", limits, hint,
                        f"hottest zone: {kind}")]


def check_memory(ctx: Context) -> list[CheckResult]:
    limits = f"available: FAIL < {MEM_FAIL_BYTES // MIB} MiB, WARN < {MEM_WARN_BYTES // MIB} MiB"
    info: dict[str, int] = {}
    try:
        for row in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = row.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemAvailable" not in info:
        return [CheckResult("memory", "", Verdict.SKIP, None, "MiB", limits,
                            "memory figures unavailable (/proc/meminfo)")]
    avail = info["MemAvailable"]
    verdict = grade(avail, warn=MEM_WARN_BYTES, fail=MEM_FAIL_BYTES, higher_is_worse=False)
    if avail in (MEM_WARN_BYTES, MEM_FAIL_BYTES):
        verdict = Verdict.PASS if avail == MEM_WARN_BYTES else Verdict.WARN
    hint = "" if verdict is Verdict.PASS else (
        "little free memory: stop programs that do not belong on the box ('top')")
    return [CheckResult("memory", "", verdict, round(avail / MIB, 1), "MiB", limits, hint,
                        f"of {info.get('MemTotal', 0) / MIB:.0f} MiB")]
