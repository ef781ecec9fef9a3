"""Boot the box's image in qemu and check it over the serial console.

Usage: .venv/bin/python os-image/vmtest.py --image build/image-amd64 [--bundles build/bundles]

Works on a copy of the built disk (the image itself is not changed). The copy gets a site seed on
its ESP (copied onto the data partition when the box formats it on first boot: a config with
transport = "none", an age recipient whose identity only this test holds, test audio) and a root
shell on the console (appliance.debug_console in the ESP's GRUB environment). The VM has a TPM
(swtpm). In the VM: the data partition must come up encrypted (LUKS2, its key sealed to the TPM)
and its escrowed recovery key must open it; snd-aloop is loaded, the test audio is played into
the loopback and the box must record and seal the call; a SIGKILLed recorder must be restarted
by systemd; a stage that stops its watchdog keep-alives (SIGSTOP) must be restarted by systemd's
watchdog; the VM is killed during recording and must lose at most the ring's sync window and
come back recording; with a new TPM the box must ask for the recovery key on the console, keep
its data and seal the key to the new TPM. With --bundles: an update bundle installs, the box
boots the new slot and marks it good after boot-check; a bundle whose boot-check fails is rolled
back by itself.
Exit 0 when every check passed, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
RATE = 8000  # the box's storage rate
DEVICE_RATE = 48000  # snd-aloop offers 48 kHz; the box resamples to RATE
SYNC_INTERVAL_MS = 500
BOOT_TIMEOUT_S = 900.0  # TCG on a busy machine boots in minutes
KVM_PROBE_S = 60.0
DISK_EXTRA_MB = 1024  # the test disk is this much larger than the image

# Per architecture of the image (layout.env's ARCH): UEFI firmware (code, and the variable store
# each VM starts from) and a factor on every console timeout under TCG. The arm64 guest (virt,
# Cortex-A72) stayed well inside amd64's timeouts here (shell in 74 s, the first-boot checks in
# 381 s, next to an amd64 TCG VM on 2 cores; os-image/README.md): its factor is a margin for
# emulating another instruction set on a slower host, not a measured ratio.
FIRMWARE = {
    "amd64": (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    "arm64": (Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd")),
}
TCG_SLOWDOWN = {"amd64": 1.0, "arm64": 2.0}
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


# The console shell: no echo, no kernel messages, no pager (journalctl and systemctl would wait).
SHELL_SETUP = ("stty -echo; dmesg -n 1; export SYSTEMD_PAGER= PAGER=cat SYSTEMD_COLORS=0 TERM=dumb "
               "SYSTEMD_LESS=\n")


class CheckFailed(Exception):
    pass


class Report:
    def __init__(self) -> None:
        self.passed: list[str] = []

    def ok(self, what: str) -> None:
        self.passed.append(what)
        print(f"  PASS {what}", flush=True)

    def check(self, cond: bool, what: str, detail: str = "") -> None:
        if not cond:
            raise CheckFailed(f"{what}: {detail}" if detail else what)
        self.ok(what if not detail else f"{what} ({detail})")


def sh(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def read_layout(image: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (image / "layout.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if value.isdigit():
            out[key] = int(value)
    return out


def read_arch(image: Path) -> str:
    """The image's architecture as build.sh wrote it in layout.env (amd64 when it names none)."""
    for line in (image / "layout.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ARCH":
            if value not in FIRMWARE:
                raise ValueError(f"layout.env: ARCH={value} (accepted: {', '.join(FIRMWARE)})")
            return value
    return "amd64"


def qemu_platform(arch: str, kvm: bool, uefi: bool, vars_path: Path) -> list[str]:
    """The qemu binary, machine, CPU, firmware and watchdog device for the image's architecture."""
    accel = "kvm" if kvm else "tcg"
    code = FIRMWARE[arch][0]
    firmware = ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,file={vars_path}"]
    # The i6300ESB is a PCI watchdog, so both machines have it: the armed hardware watchdog is real.
    watchdog = ["-device", "i6300esb", "-action", "watchdog=reset"]
    if arch == "arm64":
        # virt boots only through UEFI (AAVMF). Cortex-A72: the core of common arm64 boards
        # (ARMv8.0), and much faster under TCG than 'max' (no emulated pointer authentication).
        return ["qemu-system-aarch64", "-machine", f"virt,accel={accel}",
                "-cpu", "host" if kvm else "cortex-a72", *watchdog, *firmware]
    # TCG's default CPU lacks x86-64-v2 (SSE4.2, POPCNT), which numpy's wheels require.
    return ["qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", "host" if kvm else "max",
            *watchdog, *(firmware if uefi else [])]


def write_grubenv(path: Path, values: dict[str, str]) -> None:
    text = "# GRUB Environment Block\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    if len(text) > 1024:
        raise ValueError("grub environment larger than 1024 bytes")
    path.write_text(text + "#" * (1024 - len(text)))


def read_grubenv(disk: Path, esp_offset_mb: int) -> dict[str, str]:
    text = sh("mtype", "-i", f"{disk}@@{esp_offset_mb}M", "::/EFI/BOOT/grubenv")
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_audio(seconds_idle: float = 3.0, calls: int = 1, call_s: int = 8) -> np.ndarray:
    """Two channels at 8 kHz: line 1 carries calls (noise in syllables, like speech), line 2
    a quiet line. Each call lasts call_s and is followed by 8 s of quiet line."""
    rng = np.random.default_rng(2024)
    parts = [rng.standard_normal(int(seconds_idle * RATE)) * 8]
    for _ in range(calls):
        t = np.arange(call_s * RATE) / RATE
        env = 0.05 + 0.95 * np.abs(np.sin(np.pi * 3 * t))
        voice = np.convolve(rng.standard_normal(t.size), np.ones(4) / 4, mode="same") * 6000 * env
        parts += [voice, rng.standard_normal(8 * RATE) * 8]
    line1 = np.clip(np.concatenate(parts), -32000, 32000).astype(np.int16)
    line2 = (rng.standard_normal(line1.size) * 8).astype(np.int16)
    return np.stack([line1, line2], axis=1)


class Console:
    """The VM's serial console: a reader thread keeps everything, commands run between markers."""

    def __init__(self, path: Path, log_path: Path, slowdown: float = 1.0) -> None:
        self.slowdown = slowdown  # every timeout is scaled by it (a slower guest)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(100):
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.1)
        else:
            raise CheckFailed(f"cannot connect to the VM's console {path}")
        self.buf = ""
        self.cond = threading.Condition()
        self.log = log_path.open("a", encoding="utf-8", errors="replace")
        self.counter = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            text = data.decode("utf-8", errors="replace")
            with self.cond:
                self.buf += text
                self.log.write(text)
                self.log.flush()
                self.cond.notify_all()
            if not data:
                return

    def mark(self) -> int:
        with self.cond:
            return len(self.buf)

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        timeout *= self.slowdown
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        with self.cond:
            while True:
                m = rx.search(self.buf, since)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed(f"console: no {pattern!r} within {timeout:.0f} s")
                self.cond.wait(min(left, 1.0))

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> tuple[int, str]:
        self.counter += 1
        n = self.counter
        since = self.mark()
        self.send(f"printf '__B%s__\\n' {n}; {command} 2>&1; printf '__E%s_%s__\\n' {n} $?\n")
        m = self.wait_for(rf"__E{n}_(\d+)__", timeout, since)
        begin = self.buf.index(f"__B{n}__", since) + len(f"__B{n}__\n")
        out = self.buf[begin:m.start()].replace("\r", "")
        rc = int(m.group(1))
        if check and rc != 0:
            raise CheckFailed(f"in the VM, '{command}' exited {rc}: {out.strip()[-400:]}")
        return rc, out.strip()

    def close(self) -> None:
        self.sock.close()


class VM:
    """The box in qemu. Firmware: SeaBIOS (the image's BIOS boot path) when the image has one,
    else OVMF (UEFI); ``uefi=True`` forces OVMF. KVM when /dev/kvm can run the guest, else TCG."""

    def __init__(self, disk: Path, work: Path, extra_disk: Path | None, uefi: bool,
                 arch: str = "amd64") -> None:
        self.disk, self.work, self.extra_disk, self.uefi, self.arch = disk, work, extra_disk, uefi, arch
        self.proc: subprocess.Popen[bytes] | None = None
        self.tpm_proc: subprocess.Popen[bytes] | None = None
        self.console: Console | None = None
        self.boots = 0
        # The board's TPM (swtpm, a software TPM 2.0 that keeps its state in this folder across
        # boots, as a chip would). A new folder is a new TPM: the board replaced or the TPM cleared.
        self.tpm_state = work / "tpm-1"
        self.with_tpm = True
        self.vars = work / "OVMF_VARS.fd"
        if uefi:
            shutil.copy(FIRMWARE[arch][1], self.vars)
        # KVM runs only a guest of the host's own architecture.
        self.kvm = os.access("/dev/kvm", os.R_OK | os.W_OK) and arch == HOST_ARCH
        if not self.kvm:
            why = ("/dev/kvm is not usable" if arch == HOST_ARCH
                   else f"KVM cannot run an {arch} guest on this {HOST_ARCH} host")
            print(f"WARNING: {why}: falling back to TCG emulation (slow)", flush=True)
        self.accel_probed = False
        self.tpm_driven = True  # the guest's kernel drives the TPM (guest_drives_tpm)

    def describe(self) -> str:
        fw = "UEFI (AAVMF)" if self.arch == "arm64" else "UEFI (OVMF)" if self.uefi else "BIOS (SeaBIOS)"
        return f"{self.arch}, {'KVM' if self.kvm else 'TCG'}, {fw}"

    def start(self) -> Console:
        con = self._start()
        if self.kvm and not self.accel_probed:
            # Some hosts open /dev/kvm but cannot run this guest: nested or paravirtual KVM
            # (kvm-pvm in a micro-VM) that has no hardware virtualisation to give. There OVMF dies
            # at once, SeaBIOS and GRUB crawl through emulated real mode and the kernel never
            # prints its first line. The probe waits for that line.
            self.accel_probed = True
            try:
                con.wait_for(r"Linux version", KVM_PROBE_S)
            except CheckFailed:
                err = (self.work / "qemu.stderr").read_text(errors="replace").strip().splitlines()
                self.power_cut()
                self.boots -= 1
                self.kvm = False
                print("WARNING: KVM cannot run this guest here (no kernel output in "
                      f"{KVM_PROBE_S:.0f} s{': ' + err[0] if err else ''}): falling back to TCG "
                      "emulation (slow)", flush=True)
                con = self._start()
        return con

    def _start(self) -> Console:
        self.boots += 1
        sock = self.work / f"console-{self.boots}.sock"
        argv = [
            *qemu_platform(self.arch, self.kvm, self.uefi, self.vars),
            "-m", "1024", "-smp", "2", "-nographic", "-monitor", "none",
            "-drive", f"file={self.disk},format=raw,if=virtio,cache=writeback",
            # restrict=on: no way out of the VM, so the clock is never synchronised (the gate must
            # confirm a slot all the same) and nothing leaves the test machine.
            "-nic", "user,model=virtio-net-pci,restrict=on",
            "-chardev", f"socket,id=con,path={sock},server=on,wait=off",
            "-serial", "chardev:con",
        ]
        if self.extra_disk is not None:
            argv += ["-drive", f"file={self.extra_disk},format=raw,if=virtio,readonly=on"]
        if self.with_tpm:
            argv += self._start_tpm()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=(self.work / "qemu.stderr").open("ab"))
        slowdown = 1.0 if self.kvm else TCG_SLOWDOWN[self.arch]
        self.console = Console(sock, self.work / "console.log", slowdown)
        return self.console

    def _start_tpm(self) -> list[str]:
        self.tpm_state.mkdir(exist_ok=True)
        sock = self.work / f"tpm-{self.boots}.sock"
        self.tpm_proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}",
             "--ctrl", f"type=unixio,path={sock}", "--terminate",
             "--log", f"file={self.work / 'swtpm.log'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.tpm_proc.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"swtpm did not start (log: {self.work / 'swtpm.log'})")
            time.sleep(0.05)
        # The TIS interface: on the PC's LPC bus (amd64), as a platform device on arm64's virt.
        device = "tpm-tis" if self.arch == "amd64" else "tpm-tis-device"
        return ["-chardev", f"socket,id=tpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=tpm",
                "-device", f"{device},tpmdev=tpm0"]

    def replace_tpm(self) -> None:
        """The next boot finds a new TPM (the board replaced, or its TPM cleared)."""
        self.tpm_state = self.work / f"tpm-{self.boots + 1}"

    def login(self, since: int = 0) -> float:
        assert self.console is not None
        t0 = time.monotonic()
        self.console.wait_for(r"root@box:~# ", BOOT_TIMEOUT_S, since)
        took = time.monotonic() - t0
        self.console.send(SHELL_SETUP)
        self.console.run("true")
        return took

    def power_cut(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.tpm_proc is not None:
            # swtpm ends with qemu's connection (--terminate); it is killed if it has not.
            try:
                self.tpm_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.tpm_proc.kill()
                self.tpm_proc.wait()
            self.tpm_proc = None
        if self.console:
            self.console.close()
        self.proc, self.console = None, None


def make_test_disk(image: Path, work: Path, layout: dict[str, int]) -> tuple[Path, str, np.ndarray]:
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image / "disk.img"), str(disk)], check=True)
    # The box's disk is larger than the image: the data partition must take the rest on first boot.
    subprocess.run(["truncate", "-s", f"+{DISK_EXTRA_MB}M", str(disk)], check=True)
    # Console shell and snd-aloop, through the GRUB environment on the ESP of the copy.
    env = read_grubenv(disk, layout["ESP_OFFSET_MB"])
    env["EXTRA_CMDLINE"] = "appliance.debug_console modules_load=snd-aloop systemd.show_status=error"
    write_grubenv(work / "grubenv", env)
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{layout['ESP_OFFSET_MB']}M", str(work / "grubenv"),
                    "::/EFI/BOOT/grubenv"], check=True)
    # The site's seed on the ESP (appliance/seed/, copied onto the data partition when the box
    # formats it on first boot): config, central's recipient for this test, test audio.
    data = work / "seed"
    identity = sh("age-keygen").strip()
    secret = next(ln for ln in identity.splitlines() if ln.startswith("AGE-SECRET-KEY-"))
    recipient = _recipient(secret)
    keys = data / "appliance" / "keys"
    keys.mkdir(parents=True)
    (keys / "recipients.txt").write_text(recipient + "\n")
    (data / "etc" / "appliance").mkdir(parents=True)
    (data / "etc" / "appliance" / "appliance.toml").write_text(
        '[device]\nid = "vmtest-box"\n'
        '[[capture]]\nname = "main"\nsource = "alsa"\ndevice = "hw:Loopback,1,0"\n'
        f'channels = 1\nrate = {DEVICE_RATE}\nsample_format = "S16_LE"\nperiod_ms = 20\n'
        f"[ring]\nsize_mb = 16\nsync_interval_ms = {SYNC_INTERVAL_MS}\n"
        '[uplink]\ntransport = "none"\n')
    audio = test_audio(calls=1)
    (data / "vmtest").mkdir()
    # Played at the device rate: upsampled by sox, an implementation independent of the box's.
    for name, pcm in (("call", audio), ("long", test_audio(calls=1, call_s=240))):
        soundfile.write(work / f"{name}-8k.wav", pcm[:, 0], RATE, subtype="PCM_16")
        subprocess.run(["sox", str(work / f"{name}-8k.wav"), "-r", str(DEVICE_RATE),
                        str(data / "vmtest" / f"{name}.wav")], check=True)
    esp = f"{disk}@@{layout['ESP_OFFSET_MB']}M"
    subprocess.run(["mmd", "-i", esp, "::/appliance"], check=True)
    subprocess.run(["mcopy", "-s", "-i", esp, str(data), "::/appliance/seed"], check=True)
    shutil.rmtree(data)
    return disk, secret, audio


def _recipient(secret: str) -> str:
    proc = subprocess.run(["age-keygen", "-y"], input=secret + "\n", check=True,
                          capture_output=True, text=True)
    return proc.stdout.strip()


def fetch(con: Console, path: str) -> bytes:
    _, out = con.run(f"base64 -w0 {path}", timeout=120)
    return base64.b64decode(out.strip().splitlines()[-1])


# End frame and boot id of the newest journal record; with a boot id, the newest record written
# in that boot (the records after a reboot carry the new boot's id).
RING_SCRIPT = (
    "from appliance.buffer.reader import RingReader\\n"
    "import sys\\n"
    "r = RingReader(sys.argv[1])\\n"
    "boot = sys.argv[2] if len(sys.argv) > 2 else None\\n"
    "s, o = r.newest_seq(), r.oldest_seq()\\n"
    "while s is not None and s >= o:\\n"
    "    g = r.get(s)\\n"
    "    if g is not None and (boot is None or g.boot_id.hex() == boot):\\n"
    "        print(g.frame_pos + g.frames, g.boot_id.hex(), g.rate)\\n"
    "        break\\n"
    "    s -= 1\\n"
)


RING_LINE = re.compile(r"(\d+) ([0-9a-f]{32}) (\d+)")


def ring_end(con: Console, boot: str = "") -> tuple[int, str, int]:
    out = con.run(f'/opt/appliance/bin/python -c "exec(\'{RING_SCRIPT}\')" '
                  f"/var/lib/appliance/ring/main.ring {boot}")[1]
    if not out.strip():
        raise CheckFailed(f"no journal record{' of boot ' + boot if boot else ''} in the ring")
    # The serial console also carries the kernel's and systemd's own lines: take the answer's.
    found = [m for m in map(RING_LINE.fullmatch, (ln.strip() for ln in out.splitlines())) if m]
    if not found:
        raise CheckFailed(f"no ring end in the answer: {out[-300:]!r}")
    end, boot_id, rate = found[-1].groups()
    return int(end), boot_id, int(rate)


def unit_prop(con: Console, unit: str, prop: str) -> str:
    return con.run(f"systemctl show -p {prop} --value {unit}")[1].strip()


def wait_until(con: Console, command: str, timeout: float, what: str) -> str:
    timeout *= con.slowdown
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        rc, out = con.run(command, check=False)
        if rc == 0:
            return out
        time.sleep(1)
    raise CheckFailed(f"{what}: not within {timeout:.0f} s (last output: {out[-300:]})")


def segments(con: Console) -> list[str]:
    _, out = con.run("ls /var/lib/appliance/outbox/ | grep '^seg-.*\\.seg$' || true")
    return [ln for ln in out.splitlines() if ln.endswith(".seg")]


def check_call_sealed(con: Console, rep: Report, secret: str, played: np.ndarray, before: list[str],
                      what: str) -> list[str]:
    from linerec_contract.segment import decode_wire
    from linerec_contract.verify import open_segment_audio, verify_segment

    wait_until(con, f"test $(ls /var/lib/appliance/outbox | grep -c '^seg-.*\\.seg$') -gt {len(before)}",
               90, f"{what}: a sealed call in the outbox")
    now = segments(con)
    new = [s for s in now if s not in before]
    pub = con.run("appliance keys show | sed -n 's/^public_b64 //p'")[1].strip()
    con.run(f"appliance verify --pubkey {pub} /var/lib/appliance/outbox/{new[0]}")
    seg = decode_wire(fetch(con, f"/var/lib/appliance/outbox/{new[0]}"))
    verify_segment(seg, pub)
    audio, rate = open_segment_audio(seg, secret)
    got = np.asarray(audio).reshape(-1).astype(np.float64)
    line1 = played[:, 0].astype(np.float64)
    # Played at 48 kHz and resampled by the box, so the samples sit on a grid shifted by a
    # fraction of a sample: compare the calls' level envelopes (20 ms frames), aligned by
    # cross-correlation, and their levels.
    def envelope(x: np.ndarray) -> np.ndarray:
        frames = x[: x.size // 160 * 160].reshape(-1, 160)
        return np.asarray(10 * np.log10(np.mean(frames**2, axis=1) + 1.0))

    e_got, e_ref = envelope(got), envelope(line1)
    if e_ref.size < e_got.size:
        raise CheckFailed(f"{what}: the segment ({got.size} samples) is longer than the audio played")
    xc = [np.corrcoef(e_ref[i:i + e_got.size], e_got)[0, 1] for i in range(e_ref.size - e_got.size + 1)]
    lag = int(np.argmax(xc))
    level = float(np.median(e_got[e_got > 40]) - np.median(e_ref[lag:lag + e_got.size][e_got > 40]))
    rep.check(rate == RATE and xc[lag] >= 0.95 and abs(level) <= 1.0,
              f"{what}: {new[0]} verified on the box and on the host, decrypted with the test identity",
              f"{got.size / RATE:.1f} s of line 1; level envelope correlation {xc[lag]:.3f} with the "
              f"call played, level difference {level:+.2f} dB")
    return now


def boot_and_basics(vm: VM, rep: Report, first: bool) -> Console:
    con = vm.start()
    took = vm.login()
    rep.ok(f"boot {vm.boots}: root shell on the serial console after {took:.0f} s")
    rc, state = con.run("systemctl is-system-running --wait", timeout=BOOT_TIMEOUT_S, check=False)
    state = state.strip().splitlines()[-1] if state.strip() else ""
    if state != "running":
        _, failed = con.run("systemctl --failed --no-legend; for u in $(systemctl --failed --no-legend "
                            "--plain | cut -d' ' -f1); do journalctl -b -u $u -o cat | tail -8; done",
                            timeout=120, check=False)
        raise CheckFailed(f"system state {state!r}, not 'running': {failed}")
    rep.ok("systemd reached 'running' (no failed unit)")
    if not first:
        return con
    units = "appliance-capture@main appliance-recorder appliance-uplink appliance-provision"
    # 'systemctl is-active A B' exits 0 when any one is active: count them instead.
    out = wait_until(con, f"systemctl is-active {units} | grep -cx active | grep -qx 4 && "
                     f"systemctl is-active {units}", 120, "stage units and provisioning active")
    rep.check(out.split() == ["active"] * 4, "stage units and provisioning active", " ".join(out.split()))
    opts = con.run("findmnt -no OPTIONS /")[1]
    rc, _ = con.run("touch /etc/should-fail", check=False)
    rep.check(opts.split(",")[0] == "ro" and rc != 0, "root file system mounted read-only",
              opts.split(",")[0])
    mounts = con.run("findmnt -no SOURCE,FSTYPE /data; findmnt -no SOURCE /var/lib/appliance")[1]
    rep.check("/dev/mapper/data ext4" in " ".join(mounts.split()) and "[/appliance]" in mounts,
              "data partition (ext4 on /dev/mapper/data) holds /var/lib/appliance", " ".join(mounts.split()))
    keys = con.run("ls -l /var/lib/appliance/keys; /opt/appliance/bin/python -c \"import json; "
                   "print(json.load(open('/var/lib/appliance/keys/enrolment-request.json'))['csr_pem'])\""
                   " | openssl req -noout -subject")[1]
    owned = [ln for ln in keys.splitlines() if ln.endswith((" device.key", " client.key"))]
    rep.check(len(owned) == 2 and all(ln.startswith("-rw-------") and " appliance appliance " in ln
                                      for ln in owned) and "CN = vmtest-box" in keys,
              "first boot: signing and TLS keys (0600, user appliance) and an enrolment request "
              "for CN=vmtest-box")
    wd = con.run("systemctl show -p RuntimeWatchdogUSec --value; "
                 "journalctl -b -o cat | grep -i 'hardware watchdog' | head -3")[1]
    rep.check("30s" in wd and "watchdog" in wd.lower(), "hardware watchdog armed by systemd",
              " | ".join(wd.splitlines()))
    jd = con.run("journalctl --disk-usage; ls -d /var/log/journal/*/ | head -1; "
                 "systemd-analyze cat-config systemd/journald.conf | grep -E '^(Storage|SystemMaxUse)='")[1]
    rep.check("SystemMaxUse=64M" in jd and "/var/log/journal/" in jd,
              "journal persistent on the data partition, bounded", " | ".join(jd.splitlines()))
    ts = con.run("systemctl is-active systemd-timesyncd; timedatectl show -p NTP --value")[1]
    rep.check(ts.split() == ["active", "yes"], "time synchronisation (systemd-timesyncd) active")
    snd = con.run("cat /proc/asound/cards")[1]
    rep.check("Loopback" in snd, "snd-aloop loaded in the guest")
    return con


# The TPM token's sealed blob is summarised by a hash: it changes when the key is sealed again.
LUKS_SCRIPT = ("import hashlib, json, sys; m = json.load(sys.stdin); "
               "print(json.dumps({'keyslots': sorted(m['keyslots']), 'tokens': "
               "[{'type': t['type'], 'keyslots': t['keyslots'], 'pcrs': t.get('tpm2-pcrs'), "
               "'blob': hashlib.sha256(t.get('tpm2-blob', '').encode()).hexdigest()[:16]} "
               "for t in m['tokens'].values()]}, separators=(',', ':')))")


def luks_layout(con: Console) -> dict[str, list[Any]]:
    """The data partition's key slots and tokens, from its LUKS2 header's JSON metadata."""
    out = con.run("cryptsetup luksDump --dump-json-metadata /dev/disk/by-partlabel/data | "
                  f'/opt/appliance/bin/python -c "{LUKS_SCRIPT}"')[1]
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith('{"keyslots"')), None)
    if line is None:
        raise CheckFailed(f"no LUKS2 metadata in the answer: {out[-300:]!r}")
    return dict(json.loads(line))


def check_luks_layout(con: Console, rep: Report, what: str) -> str:
    """Two key slots: one sealed to the TPM (PCR 7) and the escrowed recovery key; the random
    key of the first format is gone. Returns the TPM token's blob summary."""
    luks = luks_layout(con)
    tokens = sorted((t["type"], t["pcrs"]) for t in luks["tokens"])
    covered = sorted(k for t in luks["tokens"] for k in t["keyslots"])
    rep.check(tokens == [("systemd-recovery", None), ("systemd-tpm2", [7])]
              and covered == luks["keyslots"] and len(luks["keyslots"]) == 2,
              f"{what}: LUKS2 key slots are the TPM's (PCR 7) and the recovery key's only",
              f"slots {luks['keyslots']}, tokens {tokens}")
    return str(next(t["blob"] for t in luks["tokens"] if t["type"] == "systemd-tpm2"))


def selftest_encryption(con: Console) -> str:
    """The self-test's data-encryption line, run as the stages' user."""
    out = con.run("runuser -u appliance -- appliance selftest --only data-encryption", check=False)[1]
    lines = [ln.strip() for ln in out.splitlines()]
    at = next((i for i, ln in enumerate(lines) if "data-encryption" in ln), None)
    if at is None:
        return out[-200:]
    hint = lines[at + 1] if at + 1 < len(lines) and lines[at + 1].startswith("->") else ""
    return f"{lines[at]} {hint}".strip()  # the verdict line, and its hint when it has one


def guest_drives_tpm(vm: VM, con: Console, rep: Report) -> bool:
    """Whether the guest's kernel can drive the TPM the VM gives it: qemu attaches a TIS
    interface (tpm-tis on amd64's LPC bus, tpm-tis-device on arm64's virt), which only a kernel
    built with CONFIG_TCG_TIS drives. The expectation comes from the guest's own kernel config;
    the firmware declares the TPM either way (ACPI TPM2 table). Debian bookworm's arm64 kernel is
    built without CONFIG_TCG_TIS (its boards' TPMs sit on SPI or I2C), and qemu 7.2's virt offers
    no other TPM interface: there the box must name a declared TPM that no driver bound."""
    built = con.run("grep -qE '^CONFIG_TCG_TIS=[ym]$' /boot/config-$(uname -r)", check=False)[0] == 0
    declared = con.run("test -e /sys/firmware/acpi/tables/TPM2", check=False)[0] == 0
    bound = con.run("test -e /dev/tpmrm0", check=False)[0] == 0
    rep.check(bound == built, "the guest binds the TPM exactly when its kernel has the TIS driver",
              f"CONFIG_TCG_TIS {'set' if built else 'not set'}; /dev/tpmrm0 "
              f"{'present' if bound else 'absent'}")
    if not built:
        rep.check(declared, "the firmware declares the VM's TPM that no driver binds (ACPI TPM2 table)")
        print(f"  NOTE {vm.arch}: the guest's kernel has no driver for qemu's TIS TPM: the TPM "
              "checks become 'declared TPM, no driver' checks", flush=True)
    return built


def test_encryption(vm: VM, con: Console, rep: Report, escrow_identity: Path,
                    layout: dict[str, int]) -> str:
    """First boot encrypted the data partition: checks its header, its journal, and that the
    escrowed recovery key (decrypted on the host by the stock age with the escrow identity)
    opens it. Where the guest's kernel cannot drive the VM's TPM, the box must say so and keep
    the key on the ESP. Returns the recovery key."""
    status = con.run("cryptsetup status data | sed -n 's/^ *\\(type\\|cipher\\|keysize\\): *//p'")[1]
    rep.check(status.split()[:3] == ["LUKS2", "aes-xts-plain64", "512"],
              "data partition is LUKS2 (aes-xts-plain64, 512-bit key)", " ".join(status.split()))
    log = con.run("journalctl -b -u appliance-data -o cat")[1]
    said = " | ".join(ln.removeprefix("data-partition: ")[:70] for ln in log.splitlines()
                      if ln.startswith("data-partition: "))
    vm.tpm_driven = guest_drives_tpm(vm, con, rep)
    if vm.tpm_driven:
        rep.check("first boot, formatting" in log and "key sealed to the TPM (PCR 7)" in log
                  and "seed copied" in log and "WARNING" not in log,
                  "first boot: partition formatted, key sealed to the TPM, site seed copied in", said)
        check_luks_layout(con, rep, "first boot")
        line = selftest_encryption(con)
        rep.check(line.split()[:3] == ["PASS", "data-encryption", "tpm"],
                  "self-test: data-encryption PASS (opened by the TPM)", line)
    else:
        rep.check("first boot, formatting" in log and "seed copied" in log
                  and "the firmware declares a TPM (ACPI TPM2 table), but the kernel bound no "
                  "driver to it" in log and "the key is kept on the ESP" in log,
                  "first boot, declared TPM without a driver: the box waits for it, names it, "
                  "formats with the key on the ESP and copies the seed", said)
        luks = luks_layout(con)
        rep.check(sorted(t["type"] for t in luks["tokens"]) == ["systemd-recovery"]
                  and len(luks["keyslots"]) == 2,
                  "first boot: LUKS2 key slots are the ESP key's and the recovery key's",
                  f"slots {luks['keyslots']}, tokens {[t['type'] for t in luks['tokens']]}")
        line = selftest_encryption(con)
        rep.check(line.split()[:3] == ["WARN", "data-encryption", "esp-key"]
                  and "declares a TPM" in line,
                  "self-test: data-encryption WARN naming the TPM no driver bound", line)
    grown = re.search(r"partition grown to the end of (\S+): (\d+) -> (\d+) MiB", log)
    size = con.run("df -BM --output=size /data | tail -1; "
                   "sfdisk --verify /dev/vda 2>&1 | grep -m1 -i 'errors* detected'")[1]
    fs_mb = int(size.split()[0].rstrip("M"))
    rep.check(grown is not None and int(grown.group(2)) == layout["DATA_MB"]
              and int(grown.group(3)) >= layout["DATA_MB"] + DISK_EXTRA_MB - 2
              and fs_mb > layout["DATA_MB"] + DISK_EXTRA_MB * 0.9 and "No errors detected" in size,
              f"first boot: the data partition grew over the disk's free {DISK_EXTRA_MB} MiB",
              f"{grown.group(0) if grown else 'not grown'}; /data {fs_mb} MiB; GPT: "
              f"{size.splitlines()[-1].strip()}")
    return check_escrowed_key(con, rep, escrow_identity, "first boot")


def check_escrowed_key(con: Console, rep: Report, escrow_identity: Path, when: str) -> str:
    """The recovery key escrowed on the ESP, decrypted on the host by the stock age with the
    escrow identity: it must open the partition, and the same key with one letter changed must
    not. Returns the key."""
    escrow = fetch(con, "/boot/efi/appliance/data-recovery-key.age")
    proc = subprocess.run(["age", "-d", "-i", str(escrow_identity)], input=escrow,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise CheckFailed(f"escrowed recovery key: age could not decrypt it: {proc.stderr.decode()[:200]}")
    key = proc.stdout.decode().strip()
    # systemd's recovery keys: 8 groups of 8 'modhex' characters.
    if not re.fullmatch(r"[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7}", key):
        raise CheckFailed(f"escrowed recovery key: not a recovery key: {key[:20]!r}...")
    wrong = key[:-1] + ("c" if key[-1] != "c" else "b")
    rep.check(opens(con, key) and not opens(con, wrong),
              f"{when}: the escrowed recovery key (ESP, decrypted by age with the escrow identity) "
              "opens the partition; the same key with one character changed does not")
    return key


def opens(con: Console, key: str) -> bool:
    """Whether a key opens the data partition (a test only: nothing is mapped). External tokens
    off: cryptsetup would otherwise try the TPM first, which opens it anyway."""
    return con.run(f"printf %s {key} | cryptsetup open --test-passphrase --disable-external-tokens "
                   "--key-file=- /dev/disk/by-partlabel/data", check=False)[0] == 0


def test_tpm_replaced(vm: VM, con: Console, rep: Report, recovery: str,
                     escrow_identity: Path) -> Console:
    """A new TPM (board replaced or TPM cleared): the box stops at the recovery prompt, takes
    the escrowed recovery key on the console, keeps its data, seals the key to the new TPM,
    replaces the used recovery key by a new escrowed one and records again."""
    before = segments(con)
    sealed = check_luks_layout(con, rep, "before the TPM is replaced")
    con.run("sync")
    vm.power_cut()
    vm.replace_tpm()
    con = vm.start()
    m = con.wait_for(r"Recovery key for the data partition", BOOT_TIMEOUT_S)
    why = con.buf[:m.start()]
    rep.check("the TPM did not release the key" in why,
              "new TPM: the box asks for the recovery key on the console and says why")
    con.send("cccccccc-cccccccc\n")
    m = con.wait_for(r"Recovery key for the data partition", 120, m.end())
    rep.check("recovery key not accepted" in con.buf[:m.start()],
              "a wrong recovery key is refused and asked again")
    con.send(recovery + "\n")
    vm.login(m.end())
    log = con.run("journalctl -b -u appliance-data -o cat")[1]
    rep.check("unlocked by the recovery key" in log and "key sealed to this TPM again" in log,
              "recovery key accepted; the key is sealed to the new TPM")
    resealed = check_luks_layout(con, rep, "after recovery")
    rep.check(resealed != sealed, "the TPM slot is a new one, sealed by the new TPM",
              f"sealed blob {sealed} -> {resealed}")
    new = check_escrowed_key(con, rep, escrow_identity, "after recovery")
    rep.check("recovery key replaced" in log and new != recovery and not opens(con, recovery),
              "after recovery: the recovery key used is replaced (the new one escrowed, the old "
              "one no longer opens the partition)")
    wait_until(con, "systemctl is-active appliance-capture@main appliance-recorder", 120,
               "stages active after the recovery")
    after = segments(con)
    rep.check(set(before) <= set(after) and len(before) > 0,
              "data kept through the recovery; recording again",
              f"{len(before)} sealed segments before, all present after")
    return con


def test_recording(vm: VM, con: Console, rep: Report, secret: str, played: np.ndarray) -> None:
    before = segments(con)
    con.run("aplay -q -D hw:Loopback,0,0 /data/vmtest/call.wav", timeout=120)
    check_call_sealed(con, rep, secret, played, before, "test call played into the loopback")


def test_restart_on_kill(con: Console, rep: Report) -> None:
    unit = "appliance-recorder.service"
    pid = unit_prop(con, unit, "MainPID")
    restarts = int(unit_prop(con, unit, "NRestarts"))
    con.run(f"kill -KILL {pid}")
    out = wait_until(con, f"test \"$(systemctl show -p MainPID --value {unit})\" != 0 -a "
                     f"\"$(systemctl show -p MainPID --value {unit})\" != {pid} && "
                     f"systemctl is-active {unit}", 30, "recorder restarted after SIGKILL")
    new_pid = unit_prop(con, unit, "MainPID")
    now = int(unit_prop(con, unit, "NRestarts"))
    rep.check(now == restarts + 1 and "active" in out,
              "SIGKILLed recorder restarted by systemd", f"pid {pid} -> {new_pid}, NRestarts {now}")


def test_watchdog_restart(con: Console, rep: Report) -> None:
    unit = "appliance-recorder.service"
    wd = unit_prop(con, unit, "WatchdogUSec")
    if wd in ("0", "infinity", ""):
        raise CheckFailed(f"stage watchdog: {unit} sets no WatchdogSec= (os-image/systemd/): a hung "
                          "stage would never be restarted")
    pid = unit_prop(con, unit, "MainPID")
    restarts = int(unit_prop(con, unit, "NRestarts"))
    con.run(f"kill -STOP {pid}")
    wait_until(con, f"test $(systemctl show -p NRestarts --value {unit}) -gt {restarts} && "
               f"systemctl is-active {unit}", 180, "watchdog restart of a stopped stage")
    result = con.run(f"journalctl -b -u {unit} -o cat | grep -i watchdog | tail -1")[1]
    rep.check("watchdog" in result.lower(), "stage that stopped its keep-alives restarted by the "
              f"watchdog (WatchdogSec {wd})", result.strip())


def test_fleet_requests(con: Console, rep: Report) -> None:
    """The fleet agent's restart and reboot requests (appliance/lifecycle.py), written by the
    product's own code as the unprivileged user the uplink runs as, acted on by the root path
    units (os-image/systemd/appliance-{restart,reboot}.{path,service})."""
    unit = "appliance-recorder.service"
    requests = "/var/lib/appliance/fleet/requests"

    def ask(action: str, boot_id: str) -> None:
        con.run("runuser -u appliance -- /opt/appliance/bin/python -c "
                "'from pathlib import Path; from appliance.lifecycle import request; "
                f"request(Path(\"/var/lib/appliance\"), \"{action}\", \"{boot_id}\")'")

    boot = con.run("cat /proc/sys/kernel/random/boot_id")[1].strip()
    pid = unit_prop(con, unit, "MainPID")
    ask("restart", boot)
    wait_until(con, f"test ! -e {requests}/restart && "
               f"test \"$(systemctl show -p MainPID --value {unit})\" != 0 -a "
               f"\"$(systemctl show -p MainPID --value {unit})\" != {pid} && "
               f"systemctl is-active {unit}", 90, "stages restarted on the fleet's restart request")
    rep.ok(f"fleet restart request (user appliance) restarted the stages through "
           f"appliance-restart.path (recorder pid {pid} -> {unit_prop(con, unit, 'MainPID')})")
    ask("reboot", "00000000-0000-0000-0000-000000000000")  # as a power cut would leave it
    wait_until(con, f"test ! -e {requests}/reboot && journalctl -b -u appliance-reboot.service "
               "-o cat | grep -q 'not from this boot'", 60, "stale reboot request ignored")
    rep.check(con.run("cat /proc/sys/kernel/random/boot_id")[1].strip() == boot,
              "a reboot request from an earlier boot removed and ignored (no reboot)")


def test_power_cut(vm: VM, con: Console, rep: Report) -> Console:
    before = segments(con)
    con.run("nohup aplay -q -D hw:Loopback,0,0 /data/vmtest/long.wav >/dev/null 2>&1 &")
    time.sleep(10)  # into the call (4 minutes long: the cut lands in it however slow the VM is)
    state = con.run("cat /var/lib/appliance/run/capture-main.json")[1]
    rep.check(re.search(r'"state": ?"running"', state) is not None, "capture running when the power is cut")
    # The ring's end is read in the guest, then the VM is killed as soon as the answer arrives:
    # frames written in that round trip (printed) are not counted as lost.
    t_read = time.monotonic()
    written, boot, ring_rate = ring_end(con)
    vm.power_cut()
    t_cut = time.monotonic()
    con = vm.start()
    vm.login()
    rep.ok(f"box back after the power cut: shell {time.monotonic() - t_cut:.0f} s after the cut")
    wait_until(con, "systemctl is-active appliance-capture@main appliance-recorder", 120,
               "stages active after the power cut")
    durable, _, _ = ring_end(con, boot)
    window = SYNC_INTERVAL_MS * ring_rate // 1000
    lost = written - durable
    rep.check(lost <= window + ring_rate * 20 // 1000,
              f"power cut lost at most the sync window ({SYNC_INTERVAL_MS} ms)",
              f"ring end {written} written before the cut, {durable} durable after it: "
              f"{max(lost, 0) / ring_rate * 1000:.0f} ms lost; the end was read at most "
              f"{(t_cut - t_read) * 1000:.0f} ms before the cut")
    first, new_boot, _ = ring_end(con)
    time.sleep(3)
    later, _, _ = ring_end(con)
    rep.check(new_boot != boot and later - first >= ring_rate, "recording again after the power cut",
              f"ring end advanced by {(later - first) / ring_rate:.1f} s in this boot")
    wait_until(con, f"test $(ls /var/lib/appliance/outbox | grep -c '^seg-.*\\.seg$') -gt {len(before)}",
               180, "the call cut by the power cut sealed after the restart")
    rep.ok("the call cut by the power cut was sealed after the restart")
    return con


def test_updates(vm: VM, con: Console, rep: Report, layout: dict[str, int]) -> None:
    # The bundles' disk, mounted again after each reboot (/run is a tmpfs).
    mount = "mkdir -p /run/bundles && (mountpoint -q /run/bundles || mount -o ro /dev/vdb /run/bundles)"
    con.run(mount)
    st = con.run("rauc status --output-format=shell | grep -E '^RAUC_SYSTEM_BOOTED_BOOTNAME='")[1]
    rep.check(st.strip().strip("'").endswith("A"), "RAUC: booted slot A", st.strip())
    con.run("rauc install /run/bundles/good.raucb", timeout=600)
    env = con.run("grub-editenv /boot/efi/EFI/BOOT/grubenv list")[1]
    rep.check("ORDER=B A" in env and "B_TRIAL=3" in env, "bundle installed into slot B, on trial",
              " ".join(env.split()))
    since = con.mark()
    con.send("systemctl reboot\n")
    since = con.wait_for(r"booting slot B", 120, since).end()
    con.wait_for(r"root@box:~# ", BOOT_TIMEOUT_S, since)
    con.send(SHELL_SETUP)
    con.run("true")
    wait_until(con, "systemctl is-active appliance-bootgate", 600, "boot gate finished on slot B")
    cmd = con.run("cat /proc/cmdline")[1]
    env = con.run("grub-editenv /boot/efi/EFI/BOOT/grubenv list")[1]
    gate = con.run("journalctl -b -u appliance-bootgate -o cat")[1]
    rep.check("rauc.slot=B" in cmd and "B_TRIAL=\n" in env + "\n" and "B_OK=1" in env
              and "boot-check: passed" in gate and "bootgate: slot B confirmed good" in gate,
              "new slot B booted, boot-check passed, slot marked good",
              " ".join(env.split()))
    unlock = con.run("journalctl -b -u appliance-data -o cat | grep '^data-partition: unlocked'")[1]
    expected = "unlocked by the TPM" if vm.tpm_driven else "unlocked by the key on the ESP (no TPM)"
    rep.check(unlock.strip().endswith(expected), f"slot B's boot: the data partition {expected}",
              unlock.strip().splitlines()[-1] if unlock.strip() else "")
    rauc = con.run("rauc status --output-format=shell | grep -E "
                   "'^RAUC_(SYSTEM_BOOTED_BOOTNAME|SLOT_STATE_1|SLOT_BOOT_STATUS_1)='")[1]
    rep.check("good" in rauc and "booted" in rauc, "RAUC: slot B booted and good",
              " ".join(rauc.split()))
    # The VM has no way out (restrict=on), so the clock was never synchronised: the gate must
    # report that and confirm the slot all the same.
    clock = next((ln for ln in gate.splitlines() if ln.startswith("selftest: ") and " clock " in ln), "")
    rep.check("FAIL" in clock and "reported only" in clock,
              "slot confirmed with the clock unsynchronised (the clock does not gate a slot)",
              " ".join(clock.split()[:5]))
    con.run(mount)
    con.run("rauc install /run/bundles/bad.raucb", timeout=600)
    env = con.run("grub-editenv /boot/efi/EFI/BOOT/grubenv list")[1]
    rep.check("ORDER=A B" in env and "A_TRIAL=3" in env, "broken bundle installed into slot A, on trial")
    since = con.mark()
    con.send("systemctl reboot\n")
    since = con.wait_for(r"booting slot A", 120, since).end()
    m = con.wait_for(r"booting slot B", BOOT_TIMEOUT_S + 600, since)
    since = m.end()
    con.wait_for(r"root@box:~# ", BOOT_TIMEOUT_S, since)
    con.send(SHELL_SETUP)
    con.run("true")
    cmd = con.run("cat /proc/cmdline")[1]
    env = con.run("grub-editenv /boot/efi/EFI/BOOT/grubenv list")[1]
    prev = con.run("journalctl -b -1 -u appliance-bootgate -o cat")[1]
    why = con.run("journalctl -b -1 -u appliance-bootgate -o cat | grep -E "
                  "'^(sealed segment|selftest: (FAILED|could not))' | head -2")[1]
    rep.check("rauc.slot=B" in cmd and "A_OK=0" in env
              and "bootgate: boot-check FAILED on slot A" in prev
              and "marked slot rootfs.0 as bad" in prev,
              "broken slot A failed boot-check, was marked bad and the box fell back to slot B by itself",
              " | ".join(why.splitlines()))
    wait_until(con, "systemctl is-active appliance-capture@main appliance-recorder", 60,
               "recording after the rollback")
    rep.ok("recording after the rollback")


def test_uefi_path(vm: VM, rep: Report, layout: dict[str, int]) -> None:
    """The same disk through UEFI firmware (OVMF): GRUB's EFI build reads the same grub.cfg and
    environment block and boots the slot the BIOS path would boot, up to the kernel and the data
    partition's unlock, which the TPM must refuse to this other firmware."""
    if vm.proc is not None:
        vm.power_cut()  # the box is idle and its data synced; the rest of the test is done
    env = read_grubenv(vm.disk, layout["ESP_OFFSET_MB"])
    want = next(s for s in env.get("ORDER", "A B").split() if env.get(f"{s}_OK") == "1")
    vm.uefi = True
    shutil.copy(Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), vm.vars)
    t0 = time.monotonic()
    con = vm.start()
    m = con.wait_for(r"booting slot ([AB])", BOOT_TIMEOUT_S)
    con.wait_for(r"Linux version", BOOT_TIMEOUT_S, m.end())
    rep.check(m.group(1) == want, f"UEFI path ({vm.describe()}): GRUB EFI read the same environment "
              f"and booted slot {m.group(1)} to the kernel",
              f"{time.monotonic() - t0:.0f} s; ORDER={env.get('ORDER')}")
    # The key is sealed to PCR 7 as SeaBIOS left it; OVMF measures its Secure Boot state into
    # PCR 7, so the same TPM must refuse the key to this other boot chain.
    m = con.wait_for(r"the TPM did not release the key|unlocked by the TPM", BOOT_TIMEOUT_S, m.end())
    rep.check(m.group(0).startswith("the TPM did not"),
              "the same TPM refuses the key to another firmware (PCR 7 differs): recovery prompt")
    vm.power_cut()


def test_board_without_tpm(vm: VM, rep: Report, layout: dict[str, int]) -> None:
    """A board without a TPM: the data partition made blank again (as the image ships it), first
    boot without a TPM must format it with the key kept on the ESP and say so, and the next boot
    must open it with that key."""
    if vm.proc is not None:
        vm.power_cut()
    mark = re.search(r'^MARK="(.*)"$', (HERE / "rootfs/usr/lib/appliance/data-unlock").read_text(),
                     re.MULTILINE)
    assert mark is not None
    blank = (mark.group(1) + "\n").encode() * (8 * 2**20 // (len(mark.group(1)) + 1) + 1)
    with vm.disk.open("r+b") as f:
        f.seek(layout["DATA_OFFSET_MB"] * 2**20)
        f.write(blank[: 8 * 2**20])
    vm.uefi, vm.with_tpm = layout.get("BIOS_BOOT", 0) != 1, False
    con = vm.start()
    vm.login()
    log = con.run("journalctl -b -u appliance-data -o cat | grep '^data-partition: '")[1]
    luks = luks_layout(con)
    rep.check("first boot, formatting" in log and "WARNING: no TPM: the key is kept on the ESP" in log
              and sorted(t["type"] for t in luks["tokens"]) == ["systemd-recovery"]
              and len(luks["keyslots"]) == 2,
              "board without a TPM: first boot formats the partition, keeps the key on the ESP and warns",
              f"slots {luks['keyslots']}, tokens {[t['type'] for t in luks['tokens']]}")
    line = selftest_encryption(con)
    rep.check(line.split()[:3] == ["WARN", "data-encryption", "esp-key"],
              "self-test on the board without a TPM: data-encryption WARN (key on the ESP)", line)
    wait_until(con, "systemctl is-active appliance-capture@main appliance-recorder", 120,
               "stages active on the board without a TPM")
    con.run("sync")
    vm.power_cut()
    con = vm.start()
    vm.login()
    log = con.run("journalctl -b -u appliance-data -o cat | grep '^data-partition: '")[1]
    mnt = con.run("findmnt -no SOURCE /data")[1]
    rep.check("unlocked by the key on the ESP (no TPM)" in log and mnt.strip() == "/dev/mapper/data",
              "board without a TPM: the next boot opens the partition with the key on the ESP")
    vm.power_cut()


def diagnose(con: Console) -> None:
    """After a failed check, while the box still answers: what its units say."""
    try:
        _, out = con.run("systemctl --failed --no-legend; systemctl is-active appliance-capture@main "
                         "appliance-recorder appliance-uplink appliance-bootgate; journalctl -b -o cat "
                         "-u 'appliance*' | tail -40", timeout=120, check=False)
    except CheckFailed:
        return
    print("vmtest: state of the box after the failure:\n" + "\n".join(
        f"    {line[:240]}" for line in out.splitlines()), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True, help="folder with disk.img and layout.env")
    ap.add_argument("--bundles", type=Path, help="folder with good.raucb and bad.raucb")
    ap.add_argument("--escrow-identity", type=Path, required=True,
                    help="the age identity the image's escrow recipients belong to")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--uefi", action="store_true",
                    help="boot through UEFI (OVMF) even when the image can boot from a BIOS")
    ap.add_argument("--updates-only", action="store_true",
                    help="with --bundles: only the first-boot basics and the update checks")
    args = ap.parse_args()
    if not (args.image / "disk.img").is_file() or not (args.image / "layout.env").is_file():
        print(f"vmtest: {args.image} holds no disk.img/layout.env (run 'make image' first)", file=sys.stderr)
        return 2
    if not args.escrow_identity.is_file():
        print(f"vmtest: --escrow-identity {args.escrow_identity}: no such file (the identity of the "
              "image's escrow recipients, made by escrow-key.sh)", file=sys.stderr)
        return 2
    layout = read_layout(args.image)
    try:
        arch = read_arch(args.image)
    except ValueError as err:
        print(f"vmtest: {err}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vmtest-", dir=args.image.parent))
    rep = Report()
    t0 = time.monotonic()
    vm: VM | None = None
    try:
        disk, secret, played = make_test_disk(args.image, work, layout)
        extra = None
        if args.bundles:
            extra = work / "bundles.ext4"
            size = sum(p.stat().st_size for p in args.bundles.glob("*.raucb")) // 2**20 + 64
            subprocess.run(["truncate", "-s", f"{size}M", str(extra)], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(args.bundles), str(extra)], check=True)
        vm = VM(disk, work, extra, uefi=args.uefi or layout.get("BIOS_BOOT", 0) != 1, arch=arch)
        print(f"vmtest: booting {args.image / 'disk.img'} (copy in {work}; {vm.describe()})",
              flush=True)
        con = boot_and_basics(vm, rep, first=True)
        recovery = test_encryption(vm, con, rep, args.escrow_identity, layout)
        if not (args.updates_only and args.bundles):
            test_recording(vm, con, rep, secret, played)
            test_restart_on_kill(con, rep)
            test_watchdog_restart(con, rep)
            test_fleet_requests(con, rep)
            con = test_power_cut(vm, con, rep)
            if vm.tpm_driven:
                con = test_tpm_replaced(vm, con, rep, recovery, args.escrow_identity)
            else:
                print("  SKIP new TPM and recovery prompt: the guest's kernel drives no TPM here "
                      "(the recovery key opened the partition above)", flush=True)
        if args.bundles:
            assert vm.console is not None
            test_updates(vm, vm.console, rep, layout)
        ran_on = vm.describe()
        if not vm.uefi:
            test_uefi_path(vm, rep, layout)
            ran_on += "; one boot UEFI (OVMF)"
        test_board_without_tpm(vm, rep, layout)
        print(f"vmtest: all {len(rep.passed)} checks passed in {time.monotonic() - t0:.0f} s "
              f"({ran_on})", flush=True)
        return 0
    except (CheckFailed, ValueError, OSError) as err:
        print(f"  FAIL {err}", flush=True)
        if vm is not None and vm.console is not None:
            diagnose(vm.console)
        print(f"vmtest: FAILED after {len(rep.passed)} passed checks; console log: "
              f"{work / 'console.log'}", flush=True)
        args.keep = True
        return 1
    finally:
        if vm is not None and vm.proc is not None:
            vm.power_cut()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
