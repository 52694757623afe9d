#!/usr/bin/env bash
# Pretrain a protein BERT (masked LM) on Pfam with tensor, pipeline and data parallelism.
#
# With no arguments, on a fresh clone: sets up .venv, preprocesses the embedded Pfam sample (data/pfam/, 3,912
# domains of 300 families) with whole families held out for validation and test, and pretrains a small BERT with
# TP=2 on 2 local CPU processes (torchrun, gloo) in a few minutes. Checkpoints (Megatron layout) and TensorBoard
# logs go under $OUTPUT_DIR; the script prints where.
#
# Everything is selected by environment variables; extra arguments are passed to pretrain_protein_bert.py
# (Megatron-LM flags, they override the defaults below):
#   INPUT=Pfam-A.fasta[.gz]|*.sto|TAPE lmdb/json   sequences to preprocess (default: data/pfam/pfam_sample.fasta)
#   DATA_PREFIX=/data/pfam/pfam                     already preprocessed data (PREFIX_{train,valid,test} or PREFIX)
#   SPLIT=0.9,0.05,0.05                             family fractions for --split-by-family when preprocessing
#   HOLDOUT=0.05,0.05                               and fractions of the training families' sequences held out
#                                                   (the in-family valid/test sets); 0,0 for none
#   MODEL=tiny|cpu-hour|small|base                  size preset (default tiny, ~10 min on 2 CPU cores; cpu-hour,
#                                                   ~1 h on 2 cores, meant for INPUT=<all Pfam domains>; base =
#                                                   BERT-base, ProteinLM-like)
#   TP=2 PP=1                                       tensor / pipeline degrees; dp = processes / (TP x PP)
#   NPROC_PER_NODE=TP*PP NNODES=1 NODE_RANK=0 MASTER_ADDR MASTER_PORT=29500   torchrun layout (one node: a free port)
#   TRAIN_ITERS MICRO_BATCH GLOBAL_BATCH SEQ_LENGTH LR                                   training overrides
#   OUTPUT_DIR=runs/pfam_$MODEL                     checkpoints in $OUTPUT_DIR/checkpoints, logs in .../tensorboard
#   WORKERS=2                                       preprocessing processes
#   DATA_WAIT_SECONDS=3600                          nodes other than 0 wait this long for node 0's preprocessing
# Examples:
#   bash scripts/pretrain_pfam.sh                                         # the default CPU run
#   MODEL=small TRAIN_ITERS=5000 bash scripts/pretrain_pfam.sh --bf16     # longer, bf16 (fp32 main weights)
#   INPUT=/data/Pfam-A.fasta MODEL=base TP=4 PP=2 NPROC_PER_NODE=8 NNODES=4 NODE_RANK=$RANK \
#     MASTER_ADDR=node0 bash scripts/pretrain_pfam.sh --bf16               # 32 GPUs: tp 4 x pp 2 x dp 4, NCCL
# See scripts/pretrain_single_gpu.sh, scripts/pretrain_multinode.sh and docs/pretraining.md.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup_env.sh
PYTHON="$REPO_ROOT/.venv/bin/python"

MODEL="${MODEL:-tiny}"
TP="${TP:-2}"
PP="${PP:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$((TP * PP))}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
# One node without an explicit address: torchrun --standalone picks a free local port.
if [ "$NNODES" = "1" ] && [ -z "${MASTER_ADDR:-}" ]; then
  RDZV=(--standalone)
else
  RDZV=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/pfam_$MODEL}"
INPUT="${INPUT:-$REPO_ROOT/data/pfam/pfam_sample.fasta}"
SPLIT="${SPLIT:-0.9,0.05,0.05}"
HOLDOUT="${HOLDOUT:-0.05,0.05}"
WORKERS="${WORKERS:-2}"

# Size presets (docs/pretraining.md says how tiny and cpu-hour were chosen, by measurement):
#   layers hidden heads seq micro-batch global-batch iterations lr warmup-fraction eval-interval dropout mask-prob
case "$MODEL" in
  tiny)     P=(4 128 4 128 32 32 2800 4e-3 0.05 400 0.0 0.3) ;;
  cpu-hour) P=(4 192 6 128 64 64 5800 4e-3 0.03 500 0.0 0.3) ;;
  small)    P=(4 256 4 256 8 64 20000 1e-3 0.025 1000 0.1 0.15) ;;
  base)     P=(12 768 12 512 8 1024 100000 2e-4 0.02 2000 0.1 0.15) ;;
  *) echo "pretrain_pfam.sh: MODEL must be tiny, cpu-hour, small or base, got '$MODEL'" >&2; exit 2 ;;
esac
LAYERS=${P[0]} HIDDEN=${P[1]} HEADS=${P[2]}
SEQ_LENGTH="${SEQ_LENGTH:-${P[3]}}"
MICRO_BATCH="${MICRO_BATCH:-${P[4]}}"
GLOBAL_BATCH="${GLOBAL_BATCH:-${P[5]}}"
TRAIN_ITERS="${TRAIN_ITERS:-${P[6]}}"
LR="${LR:-${P[7]}}"
WARMUP_FRACTION=${P[8]}
EVAL_INTERVAL=$(( ${P[9]} < TRAIN_ITERS ? ${P[9]} : TRAIN_ITERS ))
DROPOUT="${DROPOUT:-${P[10]}}"
MASK_PROB="${MASK_PROB:-${P[11]}}"
# Evaluation: 512 held-out samples per set (BERT's 15% masking whatever MASK_PROB is), ~6,500 <mask> positions.
EVAL_ITERS=$(( (512 + GLOBAL_BATCH - 1) / GLOBAL_BATCH ))

# 1. Data: preprocess once per input. The cache directory is keyed on a hash of the input's real path, size and
# mtime, the split, the seed and the tokenizer, and is used only once its completion stamp (written last) is there;
# see megatron_protein/data/cache.py. Node 0 preprocesses; the other nodes wait for the stamp.
if [ -z "${DATA_PREFIX:-}" ]; then
  WAIT=0
  if [ "$NODE_RANK" != "0" ]; then WAIT="${DATA_WAIT_SECONDS:-3600}"; fi
  echo "[pretrain_pfam] data: $INPUT (families held out: $SPLIT; sequences of training families held out:" \
       "$HOLDOUT), cached under $OUTPUT_DIR/data"
  DATA_PREFIX="$("$PYTHON" -m megatron_protein.data.cache --input "$INPUT" --cache-dir "$OUTPUT_DIR/data" \
    --split-by-family "$SPLIT" --holdout-sequences "$HOLDOUT" --seed 1234 --tokenizer-type iupac \
    --workers "$WORKERS" --wait-seconds "$WAIT" | tail -n 1)"
fi

# 2. Pretraining. One thread per process on CPU (torchrun's default), so TP ranks do not fight over cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "[pretrain_pfam] model $MODEL: $LAYERS layers, hidden $HIDDEN, $HEADS heads, seq $SEQ_LENGTH;" \
     "TP=$TP PP=$PP on $NNODES node(s) x $NPROC_PER_NODE processes; $TRAIN_ITERS iterations"
# megatron_protein.launch is torchrun, without torchrun's report when a rank stops on a known error (that rank
# prints one line "error: ..." and the launch exits with 2).
"$PYTHON" -m megatron_protein.launch --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  "${RDZV[@]}" \
  "$REPO_ROOT/pretrain/pretrain_protein_bert.py" \
  --data-path "$DATA_PREFIX" \
  --num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
  --lr "$LR" --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION" --weight-decay 0.01 \
  --adam-beta2 0.98 --clip-grad 1.0 --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT" \
  --mask-prob "$MASK_PROB" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --log-interval 50 --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" \
  --save "$OUTPUT_DIR/checkpoints" --load "$OUTPUT_DIR/checkpoints" --save-interval "$EVAL_INTERVAL" \
  --tensorboard-dir "$OUTPUT_DIR/tensorboard" --seed 1234 \
  "$@"

echo "[pretrain_pfam] done in $((SECONDS / 60)) min $((SECONDS % 60)) s (set-up, preprocessing, training and evaluation)"
echo "[pretrain_pfam] checkpoints (Megatron layout): $OUTPUT_DIR/checkpoints"
echo "[pretrain_pfam] TensorBoard: .venv/bin/tensorboard --logdir $OUTPUT_DIR/tensorboard"
echo "[pretrain_pfam] convert for TAPE: bash scripts/megatron-tape-generator.sh $OUTPUT_DIR/checkpoints"
