#!/usr/bin/env bash
# Creates .venv and installs the pinned towerrec stack. Idempotent: a stamp file records the hash of
# this script and pyproject.toml, so a second run with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM_PKG="fbgemm-gpu==${FBGEMM_VERSION}"      # CUDA host
else
  FBGEMM_PKG="fbgemm-gpu-cpu==${FBGEMM_VERSION}"  # CPU host
fi

stamp="$VENV/.towerrec-stamp"
want=$(cat scripts/setup.sh scripts/self_check.py pyproject.toml | sha256sum | cut -d' ' -f1)-${FBGEMM_PKG}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setup: creating $VENV and installing torch==$TORCH_VERSION, $FBGEMM_PKG, torchrec==$TORCHREC_VERSION"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==${TORCH_VERSION}" "$FBGEMM_PKG"
# torchrec's metadata requires fbgemm-gpu (the CUDA build, which would overwrite the CPU one):
# install it without dependencies and list what it really needs.
"${PIP[@]}" install --no-deps "torchrec==${TORCHREC_VERSION}"
"${PIP[@]}" install tensordict "torchmetrics==1.0.3" pyre-extensions tqdm
"${PIP[@]}" install -e ".[dev]" "torch==${TORCH_VERSION}"
"$VENV/bin/python" scripts/self_check.py
echo "$want" > "$stamp"
echo "setup: done"
