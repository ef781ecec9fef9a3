#!/bin/sh
# Last build step inside the root filesystem: mount points, enabled units, the boot loader
# binary for the ESP, a read-only-friendly /etc.
set -eu
GRUB_TARGET="$1"
mkdir -p /data /boot/efi /var/lib/appliance /etc/appliance /var/lib/rauc
echo box > /etc/hostname
ln -sf /run/systemd/resolve/resolv.conf /etc/resolv.conf 2>/dev/null || true
systemctl enable systemd-networkd.service systemd-timesyncd.service appliance.target \
  appliance-provision.service appliance-bootgate.service appliance-debug-console.service \
  rauc.service >/dev/null 2>&1 || systemctl enable systemd-networkd.service systemd-timesyncd.service \
  appliance.target appliance-provision.service appliance-bootgate.service appliance-debug-console.service
systemctl mask serial-getty@.service getty@.service >/dev/null 2>&1 || true
# Jobs that need a writable root or are not wanted on a recorder.
for unit in e2scrub_reap.service e2scrub_all.timer apt-daily.timer apt-daily-upgrade.timer \
            dpkg-db-backup.timer; do
  systemctl mask "$unit" >/dev/null 2>&1 || true
done
mkdir -p /usr/lib/appliance/grub
grub-mkimage -O "$GRUB_TARGET" -p /EFI/BOOT -o /usr/lib/appliance/grub/"$( [ "$GRUB_TARGET" = x86_64-efi ] && echo BOOTX64.EFI || echo BOOTAA64.EFI)" \
  part_gpt fat ext2 normal linux boot configfile loadenv test echo regexp search search_fs_uuid \
  search_label all_video efi_gop serial terminal sleep reboot halt cat gzio
update-initramfs -u -k all >/dev/null 2>&1 || update-initramfs -c -k all
sed -i "s/@ARCH@/$(dpkg --print-architecture)/" /etc/rauc/system.conf
