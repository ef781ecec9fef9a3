#!/usr/bin/env python3
"""Make a GPT disk image bootable by a PC BIOS: GRUB's i386-pc boot.img into the first sector
(keeping the protective MBR's partition table) and core.img into the BIOS boot partition.

This is what grub-bios-setup does for a disk whose core is embedded in a BIOS boot partition,
done on a plain image file (no loop device, no device map): boot.img learns the sector of
core.img's first sector (diskboot), and diskboot's block list learns where the rest lies.
Usage: bios-boot.py DISK BOOT_IMG CORE_IMG PART_START_SECTOR PART_SECTORS
Exit 2 on bad input (sizes, a core.img that is not GRUB's i386-pc format).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

SECTOR = 512
# include/grub/i386/pc/boot.h (GRUB 2.06)
KERNEL_SECTOR = 0x5C  # 8 bytes: LBA of core.img's first sector
BOOT_DRIVE = 0x64  # 0xff: the drive the BIOS booted from (DL)
DRIVE_CHECK = 0x66  # a jump skipped for hard disks (buggy BIOSes pass a wrong DL)
MBR_KEEP = slice(0x1B8, 0x1FE)  # disk signature and partition table: the protective MBR's
# diskboot.img ends with its first block list entry: start (u64), sectors (u16), segment (u16).
BLOCKLIST = SECTOR - 12
KERNEL_SEGMENT = 0x820  # diskboot loads the rest of core.img to 0x820:0 and jumps there


def fail(msg: str) -> None:
    print(f"bios-boot: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) != 6:
        fail("usage: bios-boot.py DISK BOOT_IMG CORE_IMG PART_START_SECTOR PART_SECTORS")
    disk, boot_path, core_path = Path(argv[1]), Path(argv[2]), Path(argv[3])
    try:
        start, sectors = int(argv[4]), int(argv[5])
    except ValueError:
        fail(f"PART_START_SECTOR and PART_SECTORS must be integers, not {argv[4]!r} {argv[5]!r}")
    boot = bytearray(boot_path.read_bytes())
    core = bytearray(core_path.read_bytes())
    if len(boot) != SECTOR or boot[0x1FE:] != b"\x55\xaa":
        fail(f"{boot_path}: not GRUB's boot.img (512 bytes ending 55 AA)")
    core += bytes(-len(core) % SECTOR)
    n = len(core) // SECTOR
    if n < 2 or n > sectors:
        fail(f"{core_path}: {n} sectors do not fit the BIOS boot partition ({sectors} sectors)")
    first_start, first_len, first_seg = struct.unpack_from("<QHH", core, BLOCKLIST)
    if first_seg != KERNEL_SEGMENT or struct.unpack_from("<QHH", core, BLOCKLIST - 12)[1] != 0:
        fail(f"{core_path}: not a GRUB i386-pc core.img (diskboot block list not found)")
    with disk.open("r+b") as f:
        mbr = f.read(SECTOR)
        if len(mbr) != SECTOR or mbr[0x1FE:] != b"\x55\xaa" or mbr[0x1C2] != 0xEE:
            fail(f"{disk}: no protective MBR of a GPT disk in its first sector")
        boot[MBR_KEEP] = mbr[MBR_KEEP]
        struct.pack_into("<Q", boot, KERNEL_SECTOR, start)
        boot[BOOT_DRIVE] = 0xFF
        boot[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        # The rest of core.img lies right after its first sector, in one run.
        struct.pack_into("<QHH", core, BLOCKLIST, start + 1, n - 1, KERNEL_SEGMENT)
        f.seek(start * SECTOR)
        f.write(core)
        f.seek(0)
        f.write(boot)
    print(f"bios-boot: boot.img in sector 0, core.img ({n} sectors) at sector {start}")


if __name__ == "__main__":
    main(sys.argv)
