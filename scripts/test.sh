#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs first (idempotent), so it works on a fresh clone.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tensor_parallel -x`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup_env.sh
# The Triton kernels are checked on CPU by Triton's interpreter.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest selected no test; that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
