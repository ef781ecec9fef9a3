"""Boot the box's image in qemu and check it over the serial console.

Usage: .venv/bin/python os-image/vmtest.py --image build/image-amd64 [--bundles build/bundles]

Works on a copy of the built disk (the image itself is not changed). The copy gets a test data
partition (a config with transport = "none", an age recipient whose identity only this test
holds, test audio) and a root shell on the console (appliance.debug_console in the ESP's GRUB
environment). In the VM: snd-aloop is loaded, the test audio is played into the loopback and
the box must record and seal the call; a SIGKILLed recorder must be restarted by systemd; a
stage that stops its watchdog keep-alives (SIGSTOP) must be restarted by systemd's watchdog;
the VM is killed during recording and must lose at most the ring's sync window and come back
recording. With --bundles: an update bundle installs, the box boots the new slot and marks it
good after boot-check; a bundle whose boot-check fails is rolled back by itself.
Exit 0 when every check passed, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import base64
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

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
RATE = 8000  # the box's storage rate
DEVICE_RATE = 48000  # snd-aloop offers 48 kHz; the box resamples to RATE
SYNC_INTERVAL_MS = 500
BOOT_TIMEOUT_S = 900.0  # TCG on a busy machine boots in minutes
KVM_PROBE_S = 60.0
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
        self.console: Console | None = None
        self.boots = 0
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
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=(self.work / "qemu.stderr").open("ab"))
        slowdown = 1.0 if self.kvm else TCG_SLOWDOWN[self.arch]
        self.console = Console(sock, self.work / "console.log", slowdown)
        return self.console

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
        if self.console:
            self.console.close()
        self.proc, self.console = None, None


def make_test_disk(image: Path, work: Path, layout: dict[str, int]) -> tuple[Path, str, np.ndarray]:
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image / "disk.img"), str(disk)], check=True)
    # Console shell and snd-aloop, through the GRUB environment on the ESP of the copy.
    env = read_grubenv(disk, layout["ESP_OFFSET_MB"])
    env["EXTRA_CMDLINE"] = "appliance.debug_console modules_load=snd-aloop systemd.show_status=error"
    write_grubenv(work / "grubenv", env)
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{layout['ESP_OFFSET_MB']}M", str(work / "grubenv"),
                    "::/EFI/BOOT/grubenv"], check=True)
    # A provisioned data partition: config, central's recipient for this test, test audio.
    data = work / "data"
    subprocess.run([str(HERE / "data-skeleton.sh"), str(data)], check=True)
    identity = sh("age-keygen").strip()
    secret = next(ln for ln in identity.splitlines() if ln.startswith("AGE-SECRET-KEY-"))
    recipient = _recipient(secret)
    keys = data / "appliance" / "keys"
    keys.mkdir(parents=True)
    (keys / "recipients.txt").write_text(recipient + "\n")
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
    part = work / "data.ext4"
    subprocess.run(["truncate", "-s", f"{layout['DATA_MB']}M", str(part)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-d", str(data), str(part)], check=True)
    subprocess.run(["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={layout['DATA_OFFSET_MB']}",
                    "conv=notrunc,sparse", "status=none"], check=True)
    part.unlink()
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
    rep.check("ext4" in mounts and "[/appliance]" in mounts,
              "data partition (ext4) holds /var/lib/appliance", " ".join(mounts.split()))
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
    environment block and boots the slot the BIOS path would boot, up to the kernel."""
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
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--uefi", action="store_true",
                    help="boot through UEFI (OVMF) even when the image can boot from a BIOS")
    ap.add_argument("--updates-only", action="store_true",
                    help="with --bundles: only the first-boot basics and the update checks")
    args = ap.parse_args()
    if not (args.image / "disk.img").is_file() or not (args.image / "layout.env").is_file():
        print(f"vmtest: {args.image} holds no disk.img/layout.env (run 'make image' first)", file=sys.stderr)
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
        if not (args.updates_only and args.bundles):
            test_recording(vm, con, rep, secret, played)
            test_restart_on_kill(con, rep)
            test_watchdog_restart(con, rep)
            test_fleet_requests(con, rep)
            con = test_power_cut(vm, con, rep)
        if args.bundles:
            assert vm.console is not None
            test_updates(vm, vm.console, rep, layout)
        ran_on = vm.describe()
        if not vm.uefi:
            test_uefi_path(vm, rep, layout)
            ran_on += "; last boot UEFI (OVMF)"
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
