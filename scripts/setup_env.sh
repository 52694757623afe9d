#!/usr/bin/env bash
# Creates .venv at the repository root and installs the package with its test extras. Idempotent: a stamp file
# records the hash of what was installed, so a second call costs a few milliseconds.
# Usage: source this file, or run it; afterwards .venv/bin/python is ready.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_PROTEIN_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${MEGATRON_PROTEIN_EXTRAS:-test,kernels,hf,bench}"

stamp_of() {
  cat "$REPO_ROOT/setup.py" "$REPO_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1
  echo "$EXTRAS"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_env] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
want="$(stamp_of)"
if [ -f "$VENV/.megatron_protein_stamp" ] && [ "$(cat "$VENV/.megatron_protein_stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup_env] installing megatron_protein[$EXTRAS] into $VENV (torch pinned by constraints.txt)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel -c "$REPO_ROOT/constraints.txt"
# torch first, from the pin, so nothing later can choose another build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" -c "$REPO_ROOT/constraints.txt"
"$VENV/bin/python" -m pip install --quiet -e "$REPO_ROOT[$EXTRAS]" -c "$REPO_ROOT/constraints.txt"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
print(f"[setup_env] torch {torch.__version__} ready")
PY
echo "$want" > "$VENV/.megatron_protein_stamp"
