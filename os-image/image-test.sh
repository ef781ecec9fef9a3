#!/usr/bin/env bash
# Build the update bundles the VM test installs (a good one, and a broken one whose boot-check
# must fail: its root lacks the sealing module), then boot the image and run the checks.
# Usage: image-test.sh IMAGE_DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
IMAGE="$(realpath "${1:?usage: image-test.sh IMAGE_DIR}")"
BUNDLES="$IMAGE/../vmtest-bundles"
rm -rf "$BUNDLES" "$IMAGE/../vmtest-broken"
mkdir -p "$BUNDLES" "$IMAGE/../vmtest-broken"
t0=$(date +%s)
"$HERE/bundle.sh" "$IMAGE" "$BUNDLES/good.raucb" "$(cat "$IMAGE/version")-update"
# The broken update: the same root with appliance/seal/segment.py removed.
broken="$IMAGE/../vmtest-broken"
cp --sparse=always "$IMAGE/rootfs.ext4" "$broken/rootfs.ext4"
cp "$IMAGE/layout.env" "$broken/"
seg="$(debugfs -R "ls -p /opt/appliance/lib" "$broken/rootfs.ext4" 2>/dev/null | awk -F/ '$6 ~ /^python3/ {print $6}' | head -1)"
debugfs -w -R "rm /opt/appliance/lib/$seg/site-packages/appliance/seal/segment.py" "$broken/rootfs.ext4"
"$HERE/bundle.sh" "$broken" "$BUNDLES/bad.raucb" "broken-for-test"
rm -rf "$broken"
echo "image-test: bundles built in $(( $(date +%s) - t0 )) s"
"$REPO/.venv/bin/python" "$HERE/vmtest.py" --image "$IMAGE" --bundles "$BUNDLES"
