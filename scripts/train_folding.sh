#!/usr/bin/env bash
# Train the AlphaFold2-style folding model on real structures, then evaluate it on held-out chains.
#
# With no arguments, on a fresh clone: sets up .venv (scripts/setup_env.sh), trains the `tiny` preset on the
# embedded real PDB chains (data/structures/chains_sample.npz: 360 training chains, 40 held-out chains, each its own
# 40%-identity cluster) on CPU, printing one progress line every --log_step steps (step, loss terms, lr, steps/s,
# ETA), and ends with the held-out mean lDDT-Ca and TM-score of the model beside those of an ideal alpha-helix and
# an extended strand of the same lengths. Checkpoints (Megatron layout), metrics.jsonl, TensorBoard logs and PNG
# plots go to $MODEL_DIR (default runs/folding_tiny); running it again resumes from the last checkpoint (and, when
# the run is complete, only re-evaluates).
#
# Every argument goes to folding/train.py (see `--help`), e.g.
#   bash scripts/train_folding.sh --train_step 5000 --model_dir runs/folding_long
#   bash scripts/train_folding.sh --config_preset initial_training --precision bf16 --model_dir runs/af2   # GPU
#   bash scripts/train_folding.sh --override model.evoformer.num_blocks=4 --crop_size 96
# Environment: MODEL_DIR (default runs/folding_tiny), OMP_NUM_THREADS (default 1: on 2 shared CPU cores one
# thread per process measured faster than two for the tiny model; see docs/folding.md).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MODEL_DIR="${MODEL_DIR:-$REPO_ROOT/runs/folding_tiny}"
has_model_dir=0
for arg in "$@"; do
  case "$arg" in --model_dir|--model_dir=*) has_model_dir=1 ;; esac
done
extra=()
if [ "$has_model_dir" = "0" ]; then extra=(--model_dir "$MODEL_DIR"); fi
echo "[train_folding] uptime: $(uptime)"
start=$(date +%s)
"$REPO_ROOT/.venv/bin/python" "$REPO_ROOT/folding/train.py" "${extra[@]}" "$@"
echo "[train_folding] done in $(( $(date +%s) - start )) s (environment set-up excluded); outputs in ${MODEL_DIR}" \
     "unless --model_dir was given"
