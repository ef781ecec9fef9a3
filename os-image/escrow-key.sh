#!/bin/sh
# The escrow key for the data partitions' recovery keys: an age identity whose recipient is
# baked into the image. On first boot each box encrypts its recovery key to it and keeps the
# result on its ESP (appliance/data-recovery-key.age); only the identity's holder can read it.
# Made once in DIR if absent; a fleet keeps its own identity offline and points ESCROW_KEY at a
# folder holding only its recipients.txt. Usage: escrow-key.sh DIR
set -eu
d="$1"
[ -s "$d/recipients.txt" ] && exit 0
mkdir -p "$d"
chmod 700 "$d"
echo "escrow-key: creating a development escrow identity in $d (use your fleet's own for production)"
umask 077
age-keygen -o "$d/identity.txt" 2>/dev/null
age-keygen -y "$d/identity.txt" > "$d/recipients.txt"
