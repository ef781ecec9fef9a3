#!/bin/sh
# Runs inside the new root filesystem (chroot) during the build: the appliance's environment
# and its system user.
set -eu
# The box's extra ('box': ALSA capture, resampling) on top of the package's own dependencies.
WHEEL="$(ls /tmp/wheels/line_recorder-*.whl)[box]"
python3 -m venv /opt/appliance
if [ "${FOREIGN:-0}" = 1 ]; then
  # Another architecture: the wheels built on the build machine do not fit. The box's share of
  # requirements.lock (box.lock, made by lock-subset.py: the same packages and versions, with
  # every hash the lock holds) is installed from the package index, hash-checked; what has no
  # wheel for this architecture (pyalsaaudio) is compiled here, without build isolation, with
  # Debian's setuptools and wheel (signed by the archive) instead of unpinned ones from the index.
  apt-get install -y -q --no-install-recommends gcc libc6-dev python3-dev libasound2-dev \
    python3-wheel-whl
  export PIP_NO_CACHE_DIR=1  # nothing of the build left in the image's /root
  /opt/appliance/bin/pip install -q --no-index /usr/share/python-wheels/wheel-*.whl
  PIP_CERT=/tmp/wheels/pip-ca.pem /opt/appliance/bin/pip install -q --require-hashes \
    --no-build-isolation --use-pep517 --only-binary :all: --no-binary pyalsaaudio \
    -r /tmp/wheels/box.lock
  /opt/appliance/bin/pip install -q --no-index --no-deps /tmp/wheels/line_recorder-*.whl
  /opt/appliance/bin/pip check
  /opt/appliance/bin/pip uninstall -q -y wheel
  apt-get purge -y -q --auto-remove gcc libc6-dev python3-dev libasound2-dev python3-wheel-whl
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
