#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment in .venv for one profile:
#   run  - what `poise run` needs
#   test - run + pytest, hypothesis, ruff and verl 0.9.1 (VERL parity tests)
# The environment is rebuilt only when pyproject.toml or the constraints change (a stamp per profile).
set -euo pipefail
profile=${1:?usage: bootstrap.sh run|test}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"

python_bin=""
for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        python_bin=$(command -v "$candidate"); break
    fi
done
[ -n "$python_bin" ] || { echo "poise: Python >= 3.11 is required and none was found on PATH" >&2; exit 1; }

case "$profile" in
    run) extras="" ;;
    test) extras="[test]" ;;
    *) echo "bootstrap.sh: unknown profile '$profile' (use run or test)" >&2; exit 2 ;;
esac

stamp="$venv/.poise-$profile.stamp"
want=$(cat "$root/pyproject.toml" "$root/constraints/cpu.txt" | sha256sum | cut -d' ' -f1)
current() { [ -f "$venv/.poise-$1.stamp" ] && [ "$(cat "$venv/.poise-$1.stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; }
# the test profile installs everything the run profile does, so after `bin/test` `bin/poise` starts at once
if current "$profile" || { [ "$profile" = run ] && current test; }; then
    exit 0
fi

echo "poise: setting up $venv for '$profile' (first use or changed dependencies; takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip >&2
# torch first, from the pinned CPU release, so no later resolver step reaches for a CUDA build.
"${pip[@]}" install -q -c "$root/constraints/cpu.txt" torch >&2
"${pip[@]}" install -q -c "$root/constraints/cpu.txt" -e "$root$extras" >&2
echo "$want" > "$stamp"
