#!/usr/bin/env bash
# Host tools to build, test and bundle the OS image (Debian/Ubuntu, as root). Kept apart from
# scripts/bootstrap.sh so ordinary CI runs do not install them. Idempotent.
# ARCH=arm64 on a host of another architecture adds what the arm64 build and its VM test need:
# qemu-user-static registered with binfmt_misc (the build runs the target's programs in the
# root filesystem), qemu-system-aarch64 and the AAVMF UEFI firmware.
set -euo pipefail
ARCH="${ARCH:-amd64}"
PACKAGES=(
  mmdebstrap qemu-system-x86 qemu-utils ovmf dosfstools mtools e2fsprogs fdisk
  rauc squashfs-tools openssl age python3 swtpm
)
FOREIGN_ARM64_PACKAGES=(qemu-user-static binfmt-support arch-test qemu-system-arm qemu-efi-aarch64)
case "$ARCH" in
  amd64) ;;
  arm64) [ "$(dpkg --print-architecture)" = arm64 ] || PACKAGES+=("${FOREIGN_ARM64_PACKAGES[@]}") ;;
  *) echo "image-bootstrap: ARCH=$ARCH is not supported (accepted: amd64, arm64)" >&2; exit 2 ;;
esac
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -ne 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "image-bootstrap: missing packages: ${missing[*]} (run as root or apt-get install them)" >&2
    exit 1
  fi
  echo "image-bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A foreign arm64 build runs aarch64 programs in the target root (dpkg's maintainer scripts,
# pip compiling pyalsaaudio): the kernel hands them to qemu-aarch64-static through binfmt_misc.
# The entry needs the F flag (the interpreter is opened at registration, so it works inside the
# chroot, where the host's qemu is not visible).
if [ "$ARCH" = arm64 ] && [ "$(dpkg --print-architecture)" != arm64 ]; then
  BINFMT=/proc/sys/fs/binfmt_misc
  if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null || {
      echo "image-bootstrap: binfmt_misc is not available on this host ($BINFMT cannot be mounted); the arm64 build needs it to run aarch64 programs through qemu-user-static" >&2
      exit 1; }
  fi
  if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  fi
  if [ ! -e "$BINFMT/qemu-aarch64" ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register" 2>/dev/null || true
  fi
  entry="$(cat "$BINFMT/qemu-aarch64" 2>/dev/null || true)"
  if ! grep -qx enabled <<<"$entry" || ! grep -q '^flags:.*F' <<<"$entry"; then
    echo "image-bootstrap: qemu-aarch64 is not registered with binfmt_misc as enabled with the F flag (see $BINFMT/qemu-aarch64; qemu-user-static registers it)" >&2
    exit 1
  fi
fi
