#!/usr/bin/env bash
# Create the virtual environment and install the project with its PyTorch backend.
# Uses uv when present, else venv + pip. On Linux without an NVIDIA GPU, torch is pinned to the
# CPU build (2.13.0) so no multi-GB CUDA wheel is ever pulled.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

if command -v uv >/dev/null 2>&1; then
    [ -x "$venv/bin/python" ] || uv venv --python "$python" "$venv"
    install() { uv pip install --python "$venv/bin/python" "$@"; }
else
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    install() { "$venv/bin/python" -m pip install --quiet "$@"; }
fi

if [ "$(uname -s)" = "Linux" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    install "torch==2.13.0"
fi
install -e ".[torch,plots,dev]"
echo "installed into $venv"
