#!/usr/bin/env bash
# Set up a development machine: system packages (Debian/Ubuntu, as root) and the Python
# environment from the lock file. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev gcc libc6-dev make
  libasound2 libasound2-dev alsa-utils libportaudio2
  mosquitto mosquitto-clients mosquitto-dev libmosquitto-dev
  age flac sox libsox-fmt-all opus-tools libopus0 zstd openssl
  tmux postgresql-15 nginx systemd
  chromium chromium-driver
)
NEED_CMDS=(mosquitto age flac sox opusinfo zstd nginx)

missing_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  echo "${missing[@]:-}"
}

if command -v dpkg-query >/dev/null 2>&1; then
  missing="$(missing_packages)"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "bootstrap: installing system packages: $missing"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      # shellcheck disable=SC2086
      apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      echo "bootstrap: missing system packages: $missing" >&2
      echo "bootstrap: run 'sudo apt-get install $missing' (or run this script as root), then retry" >&2
      exit 1
    fi
  fi
else
  for cmd in "${NEED_CMDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || {
      echo "bootstrap: not a Debian/Ubuntu machine and '$cmd' is missing: install mosquitto, age, flac, sox, opus-tools, zstd, nginx, PostgreSQL 15 (for the index tests), ALSA and PortAudio libraries with your package manager, then retry" >&2
      exit 1
    }
  done
fi

PY="${PYTHON:-python3}"
STAMP=.venv/.lock-sha256
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: creating .venv from requirements.lock"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --require-hashes -r requirements.lock
  if ! out="$(.venv/bin/python -m pip install -q --no-deps -e . 2>&1)"; then
    echo "$out" >&2
    exit 1
  fi
  echo "$want" > "$STAMP"
fi
