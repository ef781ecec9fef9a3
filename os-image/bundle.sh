#!/usr/bin/env bash
# A signed RAUC update bundle (verity format) carrying a built image's root slot.
# Usage: bundle.sh IMAGE_DIR OUT.raucb [VERSION]
# Signed with $RAUC_KEYS/signing.{cert,key}.pem (default $CACHE/rauc-keys, made once by
# rauc-keys.sh); the box accepts it only if that certificate chains to the keyring in its image.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
IMAGE="${1:?usage: bundle.sh IMAGE_DIR OUT.raucb [VERSION]}"
OUT="$(realpath -m "${2:?usage: bundle.sh IMAGE_DIR OUT.raucb [VERSION]}")"
CACHE="${CACHE:-/var/cache/appliance-image}"
RAUC_KEYS="${RAUC_KEYS:-$CACHE/rauc-keys}"
[ -f "$IMAGE/rootfs.ext4" ] && [ -f "$IMAGE/layout.env" ] || {
  echo "bundle.sh: $IMAGE holds no rootfs.ext4/layout.env (run 'make image' first)" >&2; exit 2; }
# shellcheck disable=SC1091
. "$IMAGE/layout.env"
VERSION="${3:-$(cat "$IMAGE/version" 2>/dev/null || date -u +%Y%m%d%H%M%S)}"
"$HERE/rauc-keys.sh" "$RAUC_KEYS"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp --sparse=always "$IMAGE/rootfs.ext4" "$tmp/rootfs.ext4"
cat > "$tmp/manifest.raucm" <<MANIFEST
[update]
compatible=line-recorder-$ARCH
version=$VERSION

[bundle]
format=verity

[image.rootfs]
filename=rootfs.ext4
MANIFEST
rm -f "$OUT"
mkdir -p "$(dirname "$OUT")"
# MKSQUASHFS_ARGS (e.g. "-comp lz4") trades bundle size for build time: the VM test uses it.
rauc bundle --cert="$RAUC_KEYS/signing.cert.pem" --key="$RAUC_KEYS/signing.key.pem" \
  --keyring="$RAUC_KEYS/ca.cert.pem" ${MKSQUASHFS_ARGS:+--mksquashfs-args="$MKSQUASHFS_ARGS"} \
  "$tmp" "$OUT" >/dev/null
echo "bundle: $OUT (version $VERSION, $(du -h "$OUT" | cut -f1))"
