#!/bin/sh
# Runs inside the new root filesystem (chroot) during the build: the appliance's environment
# and its system user.
set -eu
# The box's extra ('box': ALSA capture, resampling) on top of the package's own dependencies.
WHEEL="$(ls /tmp/wheels/line_recorder-*.whl)[box]"
python3 -m venv /opt/appliance
if [ "${FOREIGN:-0}" = 1 ]; then
  # Another architecture: the wheels built on the build machine do not fit; the dependencies
  # come from the package index and pyalsaaudio is compiled here.
  apt-get install -y -q --no-install-recommends gcc libc6-dev python3-dev libasound2-dev
  /opt/appliance/bin/pip install -q --find-links /tmp/wheels "$WHEEL"
  apt-get purge -y -q --auto-remove gcc libc6-dev python3-dev libasound2-dev
else
  /opt/appliance/bin/pip install -q --no-index --find-links /tmp/wheels "$WHEEL"
fi
# The capture stage cannot run without these: fail the build, not the box.
/opt/appliance/bin/python -c "import alsaaudio, soxr, sounddevice"
/opt/appliance/bin/pip uninstall -q -y pip setuptools 2>/dev/null || true
/opt/appliance/bin/python -m compileall -q /opt/appliance/lib >/dev/null || true
ln -sf /opt/appliance/bin/appliance /usr/local/bin/appliance
getent passwd appliance >/dev/null || useradd --system --user-group --home-dir /var/lib/appliance \
  --no-create-home --shell /usr/sbin/nologin --groups audio appliance
