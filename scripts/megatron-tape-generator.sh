#!/usr/bin/env bash
# One command from a pretraining run to a TAPE model ready for finetune/tape_train.py.
#
# Usage: bash scripts/megatron-tape-generator.sh [MEGA_CKPT] [converter flags...]
#   MEGA_CKPT   the pretraining's --save directory (every mp_rank_* of the latest iteration is merged), an iter_*
#               directory, or one model_optim_rng.pt. Default: $PWD/models/mega (ProteinLM's default).
#   TAPE_OUT    where the TAPE model goes (default: $PWD/models/out): config.json + pytorch_model.bin
#   FORMAT      tape (default) or tape,hf-esm (also TAPE_OUT/hf-esm, a Hugging Face EsmForMaskedLM)
#   DTYPE       destination dtype (default: the checkpoint's), e.g. torch.float16
# Extra flags go to converter/megatron-converter.py (e.g. --hidden 1024 --heads 16 --layers 16 to assert sizes,
# --dst DIR to take config fields from an existing TAPE model). No questions are asked: safe in batch jobs.
# The converter checks its output against the Megatron model before publishing it and leaves nothing behind
# on failure; this script then prints the command that finetunes the model on a TAPE task.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MEGA_CKPT="${1:-$PWD/models/mega}"
[ "$#" -gt 0 ] && shift
TAPE_OUT="${TAPE_OUT:-$PWD/models/out}"
FORMAT="${FORMAT:-tape}"

if [ ! -e "$MEGA_CKPT" ]; then
  echo "megatron-tape-generator: no checkpoint at $MEGA_CKPT; pass the pretraining's --save directory" >&2
  echo "  (e.g. bash scripts/megatron-tape-generator.sh checkpoints/pfam_bert)" >&2
  exit 2
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  bash "$REPO_ROOT/scripts/setup_env.sh"
  PYTHON="$REPO_ROOT/.venv/bin/python"
fi

echo "[megatron-tape-generator] $MEGA_CKPT -> $TAPE_OUT (format $FORMAT)"
DTYPE_FLAG=()
if [ -n "${DTYPE:-}" ]; then
  DTYPE_FLAG=(--dtp "$DTYPE")
fi
"$PYTHON" "$REPO_ROOT/converter/megatron-converter.py" --src "$MEGA_CKPT" --out "$TAPE_OUT" --format "$FORMAT" \
  ${DTYPE_FLAG[@]+"${DTYPE_FLAG[@]}"} "$@"

cat <<NEXT
[megatron-tape-generator] done. $TAPE_OUT is a pre-LN BERT: load it with tape_tasks (this repository), not with
  songlab's tape-proteins, which loads it without an error and computes another function (docs/tape.md).
  Finetune and evaluate on a TAPE task, e.g.:
  $PYTHON $REPO_ROOT/finetune/tape_train.py transformer fluorescence --from_pretrained $TAPE_OUT \\
      --data_dir $REPO_ROOT/data/tape --batch_size 32 --num_train_epochs 1
NEXT
