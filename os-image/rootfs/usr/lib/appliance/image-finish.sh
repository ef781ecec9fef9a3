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
  appliance-restart.path appliance-restart-stages.path appliance-reboot.path \
  rauc.service >/dev/null 2>&1 || systemctl enable systemd-networkd.service systemd-timesyncd.service \
  appliance.target appliance-provision.service appliance-bootgate.service appliance-debug-console.service \
  appliance-restart.path appliance-restart-stages.path appliance-reboot.path
systemctl mask serial-getty@.service getty@.service >/dev/null 2>&1 || true
# Jobs that need a writable root or are not wanted on a recorder.
for unit in e2scrub_reap.service e2scrub_all.timer apt-daily.timer apt-daily-upgrade.timer \
            dpkg-db-backup.timer; do
  systemctl mask "$unit" >/dev/null 2>&1 || true
done
mkdir -p /usr/lib/appliance/grub
MODULES="part_gpt fat ext2 normal linux boot configfile loadenv test echo regexp search
  search_fs_uuid search_label serial terminal sleep reboot halt cat gzio"
# shellcheck disable=SC2086
grub-mkimage -O "$GRUB_TARGET" -p /EFI/BOOT -o /usr/lib/appliance/grub/"$( [ "$GRUB_TARGET" = x86_64-efi ] && echo BOOTX64.EFI || echo BOOTAA64.EFI)" \
  $MODULES all_video efi_gop
if [ "$GRUB_TARGET" = x86_64-efi ]; then
  # The same boot loader for a PC BIOS: core.img (written into the BIOS boot partition) reads
  # grub.cfg and the environment block from the ESP, the first partition of the boot disk.
  # shellcheck disable=SC2086
  grub-mkimage -O i386-pc -p '(hd0,gpt1)/EFI/BOOT' -o /usr/lib/appliance/grub/core.img biosdisk $MODULES
  cp /usr/lib/grub/i386-pc/boot.img /usr/lib/appliance/grub/boot.img
fi
update-initramfs -u -k all >/dev/null 2>&1 || update-initramfs -c -k all
sed -i "s/@ARCH@/$(dpkg --print-architecture)/" /etc/rauc/system.conf
