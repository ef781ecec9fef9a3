#!/bin/sh
# Write a GRUB environment block (the format grub-editenv writes: 1024 bytes, '#' padded).
# Usage: grubenv.sh FILE KEY=VALUE...
set -eu
out="$1"; shift
{
  printf '# GRUB Environment Block\n'
  for kv in "$@"; do printf '%s\n' "$kv"; done
} > "$out.tmp"
size=$(stat -c %s "$out.tmp")
[ "$size" -le 1024 ] || { echo "grubenv.sh: environment larger than 1024 bytes" >&2; exit 2; }
head -c $((1024 - size)) /dev/zero | tr '\0' '#' >> "$out.tmp"
mv "$out.tmp" "$out"
