#!/bin/sh
# The folders of a fresh data partition (mounted at /data). Usage: data-skeleton.sh DIR
set -eu
d="$1"
mkdir -p "$d/appliance" "$d/log/journal" "$d/systemd" "$d/etc/appliance" "$d/rauc"
chmod 0750 "$d/appliance"
chmod 2755 "$d/log/journal"
