#!/usr/bin/env bash
# Build the box's disk image (Debian bookworm) without loop devices or mounts:
#   disk.img   GPT: esp (GRUB + boot-count environment), root-a, root-b (ext4, mounted
#              read-only), data (blank: the box encrypts it (LUKS2) and makes its file system
#              on first boot; journal, outbox, keys, config, logs); on amd64 also a BIOS boot
#              partition, so the same disk boots from UEFI or a PC BIOS
#   rootfs.ext4  the root slot image that update bundles carry
# Usage: ARCH=amd64|arm64 OUT=build/image-amd64 os-image/build.sh
# Downloaded .debs and wheels are cached under $CACHE to speed up reruns.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
ARCH="${ARCH:-amd64}"
OUT="$(realpath -m "${OUT:-$REPO/build/image-$ARCH}")"
CACHE="${CACHE:-/var/cache/appliance-image}"
SUITE=bookworm
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# Partition sizes (MiB). The data partition is made at this size; see README for growing it.
BIOS_MB=1 ESP_MB=64 SLOT_MB=1280 DATA_MB=768
# Fixed partition UUIDs: the kernel command line names the root slot by PARTUUID.
UUID_ROOT_A=5b1c7f0e-4a61-4c3e-9d59-0a7c1a2b3c01
UUID_ROOT_B=5b1c7f0e-4a61-4c3e-9d59-0a7c1a2b3c02

case "$ARCH" in
  amd64) GRUB_TARGET=x86_64-efi EFI_BIN=BOOTX64.EFI GRUB_PKG="grub-efi-amd64-bin grub-pc-bin"
         KERNEL_PKG=linux-image-amd64 CONSOLE=ttyS0 ROOT_TYPE=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 ;;
  arm64) GRUB_TARGET=arm64-efi EFI_BIN=BOOTAA64.EFI GRUB_PKG=grub-efi-arm64-bin BIOS_MB=0
         KERNEL_PKG=linux-image-arm64 CONSOLE=ttyAMA0 ROOT_TYPE=B921B045-1DF0-41C3-AF44-4C6F280D3FAE ;;
  *) echo "build.sh: ARCH=$ARCH is not supported (accepted: amd64, arm64)" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "build.sh: run as root (mmdebstrap builds the root filesystem as root)" >&2; exit 2; }

PACKAGES=(
  systemd systemd-sysv systemd-timesyncd udev dbus kmod "$KERNEL_PKG" initramfs-tools zstd
  python3 python3-venv libasound2 alsa-utils libportaudio2 libopus0 openssl
  rauc rauc-service grub-common $GRUB_PKG e2fsprogs dosfstools cryptsetup-bin dmsetup
  libtss2-esys-3.0.2-0 libtss2-rc0 libtss2-mu0 libtss2-tcti-device0
  procps iproute2 netbase less fdisk
)

WORK="$OUT/work"
ROOT="$WORK/root"
DEBS="$CACHE/debs-$ARCH"
WHEELS="$CACHE/wheels-$ARCH"
rm -rf "$WORK"
mkdir -p "$WORK" "$DEBS" "$WHEELS" "$OUT"
VERSION="${VERSION:-$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)-$(date -u +%Y%m%d%H%M%S)}"
log() { echo "image: $(date -u +%H:%M:%S) $*"; }

# 1. The appliance as wheels: the project's own wheel plus its locked dependencies (hash-checked).
log "wheels"
PY="${PYTHON:-$REPO/.venv/bin/python}"
rm -f "$WHEELS"/line_recorder-*.whl
"$PY" -m pip wheel -q --no-deps "$REPO" -w "$WHEELS"
if [ "$ARCH" = "$(dpkg --print-architecture)" ]; then
  "$PY" -m pip wheel -q --require-hashes -r "$REPO/requirements.lock" -w "$WHEELS"
  FOREIGN=0 PIP_CA=
else
  # Foreign architecture: the box's share of the lock (same versions, same hashes) is installed
  # inside the target root under qemu-user, hash-checked (customize.sh).
  "$PY" "$HERE/lock-subset.py" "$REPO/requirements.lock" "$WHEELS"/line_recorder-*.whl box \
    "$(case "$ARCH" in arm64) echo aarch64 ;; *) echo x86_64 ;; esac)" > "$WORK/box.lock"
  # pip in the target root trusts the certificate authorities the build machine's pip trusts
  # (PIP_CERT, else the system bundle: a proxy's own CA is often only there); build time only.
  cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$WORK/pip-ca.pem"
  PIP_CA="$WORK/pip-ca.pem"
  FOREIGN=1
fi

RAUC_KEYS="${RAUC_KEYS:-$CACHE/rauc-keys}"
"$HERE/rauc-keys.sh" "$RAUC_KEYS"
# The recipients the boxes encrypt their data partition's recovery key to.
ESCROW_KEY="${ESCROW_KEY:-$CACHE/escrow-key}"
"$HERE/escrow-key.sh" "$ESCROW_KEY"
grep -Eqx 'age1[0-9a-z]{58}' "$ESCROW_KEY/recipients.txt" && ! grep -Evqx 'age1[0-9a-z]{58}|#.*|' "$ESCROW_KEY/recipients.txt" || {
  echo "build.sh: $ESCROW_KEY/recipients.txt must hold age1... recipients, one per line" >&2; exit 2; }

# 2. The root filesystem.
log "root filesystem ($ARCH, ${#PACKAGES[@]} packages and their dependencies)"
mmdebstrap --variant=minbase --arch="$ARCH" --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --skip=download/empty \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives' \
  --setup-hook="sync-in $DEBS /var/cache/apt/archives/" \
  --customize-hook="mkdir -p \"\$1\"/tmp/wheels && cp $WHEELS/*.whl $REPO/requirements.lock \"\$1\"/tmp/wheels/" \
  --customize-hook="[ $FOREIGN = 0 ] || cp $WORK/box.lock $PIP_CA \"\$1\"/tmp/wheels/" \
  --customize-hook="copy-in $HERE/customize.sh /tmp" \
  --customize-hook="chroot \"\$1\" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin FOREIGN=$FOREIGN sh /tmp/customize.sh" \
  --customize-hook="sync-out /var/cache/apt/archives $DEBS" \
  --customize-hook="cp -a $HERE/rootfs/. \"\$1\"/" \
  --customize-hook="cp $HERE/systemd/* \"\$1\"/usr/lib/systemd/system/" \
  --customize-hook="cp $RAUC_KEYS/ca.cert.pem \"\$1\"/etc/rauc/keyring.pem" \
  --customize-hook="cp $ESCROW_KEY/recipients.txt \"\$1\"/usr/lib/appliance/escrow-recipients.txt" \
  --customize-hook="echo $VERSION > \"\$1\"/usr/lib/appliance/version && chroot \"\$1\" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin sh /usr/lib/appliance/image-finish.sh $GRUB_TARGET" \
  --customize-hook="rm -rf \"\$1\"/tmp/wheels \"\$1\"/tmp/customize.sh \"\$1\"/var/cache/apt/archives/*.deb" \
  "$SUITE" "$ROOT" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main"

# The root is read-only, so the machine id is set here, once per image (mmdebstrap leaves it
# empty): journald then keeps one bounded journal folder across boots. DHCP identifies the box
# by its MAC (80-wired.network), not by this id.
python3 -c 'import uuid; print(uuid.uuid4().hex)' > "$ROOT/etc/machine-id"
ln -sf /etc/machine-id "$ROOT/var/lib/dbus/machine-id"

# 3. The boot partition: GRUB (built inside the root, so it matches the target architecture),
# its script and the environment block that holds the A/B order and the boot counters.
log "boot partition"
cp "$ROOT/usr/lib/appliance/grub/$EFI_BIN" "$WORK/$EFI_BIN"
sed -e "s/@UUID_ROOT_A@/$UUID_ROOT_A/; s/@UUID_ROOT_B@/$UUID_ROOT_B/; s/@CONSOLE@/$CONSOLE/" \
  "$HERE/boot/grub.cfg" > "$WORK/grub.cfg"
"$HERE/grubenv.sh" "$WORK/grubenv" ORDER="A B" A_OK=1 A_TRIAL= B_OK=0 B_TRIAL=
rm -f "$WORK/esp.vfat"
mkfs.vfat -C -n ESP "$WORK/esp.vfat" $((ESP_MB * 1024)) >/dev/null
mmd -i "$WORK/esp.vfat" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.vfat" "$WORK/$EFI_BIN" "$WORK/grub.cfg" "$WORK/grubenv" ::/EFI/BOOT/

# 4. Root slot image (ext4, mounted read-only) and the data partition's blank mark: its first
# 8 MiB hold a known line (see data-unlock), so that even a sparse copy of the image onto a used
# disk overwrites the LUKS headers of an earlier install; the box formats the partition on first
# boot. The mark is read from the script the image carries.
log "root slot image"
rm -f "$OUT/rootfs.ext4" "$OUT/data.ext4"
truncate -s "${SLOT_MB}M" "$OUT/rootfs.ext4"
mkfs.ext4 -q -F -L root -d "$ROOT" "$OUT/rootfs.ext4"
MARK="$(sed -n 's/^MARK="\(.*\)"$/\1/p' "$ROOT/usr/lib/appliance/data-unlock")"
[ -n "$MARK" ] || { echo "build.sh: no MARK= line in data-unlock" >&2; exit 1; }
yes "$MARK" | head -c 8388608 > "$WORK/data.blank" || true

# 5. The disk: a GPT on a sparse file, partitions written in place with dd. On amd64 a 1 MiB
# BIOS boot partition (numbered last, placed first) holds GRUB's i386-pc core; both GRUBs read
# the same grub.cfg and environment block on the ESP.
log "disk image"
rm -f "$OUT/disk.img"
ESP_AT=$((1 + BIOS_MB))
total=$((ESP_AT + ESP_MB + 2 * SLOT_MB + DATA_MB + 1))
truncate -s "${total}M" "$OUT/disk.img"
{
  echo "label: gpt"
  echo "start=${ESP_AT}MiB, size=${ESP_MB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp"
  echo "size=${SLOT_MB}MiB, type=$ROOT_TYPE, name=root-a, uuid=$UUID_ROOT_A"
  echo "size=${SLOT_MB}MiB, type=$ROOT_TYPE, name=root-b, uuid=$UUID_ROOT_B"
  echo "size=${DATA_MB}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=data"
  [ "$BIOS_MB" -eq 0 ] || echo "start=1MiB, size=${BIOS_MB}MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios-boot"
} | sfdisk -q "$OUT/disk.img"
put() { dd if="$1" of="$OUT/disk.img" bs=1M seek="$2" conv=notrunc,sparse status=none; }
put "$WORK/esp.vfat" "$ESP_AT"
put "$OUT/rootfs.ext4" $((ESP_AT + ESP_MB))
put "$WORK/data.blank" $((ESP_AT + ESP_MB + 2 * SLOT_MB))
if [ "$BIOS_MB" -ne 0 ]; then
  python3 "$HERE/bios-boot.py" "$OUT/disk.img" "$ROOT/usr/lib/appliance/grub/boot.img" \
    "$ROOT/usr/lib/appliance/grub/core.img" 2048 $((BIOS_MB * 2048))
fi
cp "$WORK/esp.vfat" "$OUT/esp.vfat"
echo "$VERSION" > "$OUT/version"
cat > "$OUT/layout.env" <<LAYOUT
ARCH=$ARCH
ESP_OFFSET_MB=$ESP_AT
ROOT_A_OFFSET_MB=$((ESP_AT + ESP_MB))
ROOT_B_OFFSET_MB=$((ESP_AT + ESP_MB + SLOT_MB))
DATA_OFFSET_MB=$((ESP_AT + ESP_MB + 2 * SLOT_MB))
BIOS_BOOT=$([ "$BIOS_MB" -ne 0 ] && echo 1 || echo 0)
SLOT_MB=$SLOT_MB
DATA_MB=$DATA_MB
LAYOUT
rm -rf "$WORK"
log "done: $OUT/disk.img ($(du -h --apparent-size "$OUT/disk.img" | cut -f1), $(du -h "$OUT/disk.img" | cut -f1) used)"
