#!/usr/bin/env bash
# Host tools to build, test and bundle the OS image (Debian/Ubuntu, as root). Kept apart from
# scripts/bootstrap.sh so ordinary CI runs do not install them. Idempotent.
set -euo pipefail
PACKAGES=(
  mmdebstrap qemu-system-x86 qemu-utils ovmf dosfstools mtools e2fsprogs fdisk
  rauc squashfs-tools openssl age python3 swtpm
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "image-bootstrap: missing packages: ${missing[*]} (run as root or apt-get install them)" >&2
  exit 1
fi
echo "image-bootstrap: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
