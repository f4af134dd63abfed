#!/usr/bin/env bash
# Installs everything fap needs on a fresh Debian machine (CPU), into a virtual env.
# Usage: bash .ci/install.sh [VENV_DIR]
# - apt: pkg-config, libturbojpeg0-dev, libopencv-dev (to build ffcv) and the real
#   Fashion-MNIST dataset (dataset-fashion-mnist) used by the tutorials.
# - pip: torch 2.14.1 + torchvision 0.29.1 (the builds these machines carry; see
#   shared/reference/env_feasibility.md), then fap with all extras.
set -euo pipefail
VENV="${1:-.venv}"
APT_PKGS="pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
"$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -e ".[deepspeed,ffcv,hf,notebooks,dev]" 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c "import torch, torchvision, timm, accelerate, fap; print('fap', fap.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| accelerate', accelerate.__version__)"
