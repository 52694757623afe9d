#!/usr/bin/env bash
# Pretrain the protein BERT on one GPU (or one CPU process): TP=1, PP=1, no torchrun needed beyond one process.
# Defaults to the 'small' preset (hidden 256, 4 layers, seq 256) with bf16 (on a GPU) and activation recompute off;
# point INPUT at Pfam-A.fasta (or DATA_PREFIX at preprocessed data) for real pretraining.
#   bash scripts/pretrain_single_gpu.sh
#   INPUT=/data/Pfam-A.fasta MODEL=base MICRO_BATCH=16 GLOBAL_BATCH=256 bash scripts/pretrain_single_gpu.sh \
#       --checkpoint-activations
# Extra arguments go to pretrain/pretrain_protein_bert.py (Megatron-LM flags).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODEL="${MODEL:-small}" TP=1 PP=1 NPROC_PER_NODE=1 NNODES=1
export OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/pfam_${MODEL}_1gpu}"
# bf16 (bf16 parameters, float32 main parameters) on a GPU that supports it; fp32 elsewhere (bf16 matmuls are
# slow on CPUs without AVX512-BF16 or AMX; pass --bf16 yourself on one that has them).
MIXED=()
if "$REPO_ROOT/.venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 1)" 2>/dev/null; then
  MIXED=(--bf16)
fi
exec bash "$REPO_ROOT/scripts/pretrain_pfam.sh" "${MIXED[@]}" "$@"
