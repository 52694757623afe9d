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
# Environment: MODEL_DIR (default runs/folding_tiny), OMP_NUM_THREADS (default 1, so that a run reproduces the
# README's numbers bit for bit; 2 threads were 1.2x faster on a quiet 2-core machine and give slightly different
# numbers; docs/folding_tiny.md, "Threads").
#
# Parallel training (DP x DAP x BP, docs/parallel_folding.md) through torchrun, from the environment:
#   NPROC_PER_NODE (default 1), DAP_DEGREE (default 1), BP_DEGREE (1 or 2, default 1), SEED (required when
#   DAP_DEGREE or BP_DEGREE > 1); the dp degree is the rest: NNODES * NPROC_PER_NODE / (DAP_DEGREE * BP_DEGREE).
#   Several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500), the same command on every node.
#   BP needs the Parallel Evoformer: --override model.evoformer.outer_product_mean_position=end.
# Example, 2 processes on this CPU with DAP (gloo; NCCL on GPUs with the same command):
#   NPROC_PER_NODE=2 DAP_DEGREE=2 SEED=0 bash scripts/train_folding.sh --train_step 20 --model_dir runs/folding_dap2
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
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
NNODES="${NNODES:-1}"
DAP_DEGREE="${DAP_DEGREE:-1}"
BP_DEGREE="${BP_DEGREE:-1}"
if [ "$NPROC_PER_NODE" = 1 ] && [ "$NNODES" = 1 ] && [ "$DAP_DEGREE" = 1 ] && [ "$BP_DEGREE" = 1 ]; then
  "$REPO_ROOT/.venv/bin/python" "$REPO_ROOT/folding/train.py" "${extra[@]}" "$@"
else
  parallel=(--distributed --dap_degree "$DAP_DEGREE" --bp_degree "$BP_DEGREE")
  if [ -n "${SEED:-}" ]; then parallel+=(--seed "$SEED"); fi
  launcher=("$REPO_ROOT/.venv/bin/torchrun" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
  if [ "$NNODES" = 1 ]; then
    launcher+=(--standalone)
  else
    launcher+=(--node_rank "${NODE_RANK:?NODE_RANK must be set on every node when NNODES > 1}"
               --master_addr "${MASTER_ADDR:?MASTER_ADDR (the address of node 0) must be set when NNODES > 1}"
               --master_port "${MASTER_PORT:-29500}")
  fi
  echo "[train_folding] ${launcher[*]} (dap ${DAP_DEGREE}, bp ${BP_DEGREE})"
  "${launcher[@]}" "$REPO_ROOT/folding/train.py" "${extra[@]}" "${parallel[@]}" "$@"
fi
echo "[train_folding] done in $(( $(date +%s) - start )) s (environment set-up excluded); outputs in ${MODEL_DIR}" \
     "unless --model_dir was given"
