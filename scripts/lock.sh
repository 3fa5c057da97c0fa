#!/usr/bin/env bash
# Lock the newest versions pyproject.toml allows: uv.lock (every platform: Linux CPU and CUDA, macOS) and
# constraints.txt, the same pins for pip, which scripts/setup.sh installs from. Uses uv, installing it
# into .venv-uv when it is not on PATH. After this, re-measure the README's numbers (README, Dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
uv=$(command -v uv || true)
if [ -z "$uv" ]; then
    [ -x .venv-uv/bin/uv ] || { "$python" -m venv .venv-uv && .venv-uv/bin/python -m pip install --quiet uv; }
    uv=.venv-uv/bin/uv
fi
"$uv" lock --upgrade
"$uv" export --all-extras --no-hashes --no-emit-project --quiet --output-file constraints.txt
echo "locked: uv.lock, constraints.txt (git diff shows what moved)"
