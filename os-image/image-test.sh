#!/usr/bin/env bash
# Build the update bundles the VM test installs (a good one, and a broken one whose boot-check
# must fail: its root lacks the segment format module), then boot the image and run the checks.
# Usage: image-test.sh IMAGE_DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
IMAGE="$(realpath "${1:?usage: image-test.sh IMAGE_DIR}")"
BUNDLES="$IMAGE/../vmtest-bundles"
rm -rf "$BUNDLES" "$IMAGE/../vmtest-broken"
mkdir -p "$BUNDLES" "$IMAGE/../vmtest-broken"
t0=$(date +%s)
# Test bundles: fast compression (they never leave this machine).
export MKSQUASHFS_ARGS="${MKSQUASHFS_ARGS:--comp lz4}"
"$HERE/bundle.sh" "$IMAGE" "$BUNDLES/good.raucb" "$(cat "$IMAGE/version")-update"
# The broken update: the same root with the segment format module (linerec_contract/segment.py)
# removed, so this slot's code cannot seal a call; its boot-check must fail.
broken="$IMAGE/../vmtest-broken"
cp --sparse=always "$IMAGE/rootfs.ext4" "$broken/rootfs.ext4"
cp "$IMAGE/layout.env" "$broken/"
py="$(debugfs -R "ls -p /opt/appliance/lib" "$broken/rootfs.ext4" 2>/dev/null | awk -F/ '$6 ~ /^python3/ {print $6}' | head -1)"
pkg="/opt/appliance/lib/$py/site-packages/linerec_contract"
debugfs -w -R "rm $pkg/segment.py" "$broken/rootfs.ext4" 2>/dev/null
if debugfs -R "ls -p $pkg" "$broken/rootfs.ext4" 2>/dev/null | grep -q '/segment\.py/'; then
  echo "image-test: could not remove $pkg/segment.py from the broken bundle's root" >&2; exit 1
fi
debugfs -R "ls -p $pkg" "$broken/rootfs.ext4" 2>/dev/null | grep -q '/manifest\.py/' || {
  echo "image-test: $pkg not found in the root (python folder '$py')" >&2; exit 1; }
"$HERE/bundle.sh" "$broken" "$BUNDLES/bad.raucb" "broken-for-test"
rm -rf "$broken"
echo "image-test: bundles built in $(( $(date +%s) - t0 )) s"
# The escrow identity the image's recipients belong to (made by escrow-key.sh with the image).
ESCROW_KEY="${ESCROW_KEY:-${CACHE:-/var/cache/appliance-image}/escrow-key}"
"$REPO/.venv/bin/python" "$HERE/vmtest.py" --image "$IMAGE" --bundles "$BUNDLES" \
  --escrow-identity "$ESCROW_KEY/identity.txt"
