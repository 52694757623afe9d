#!/usr/bin/env bash
# Pretrain the protein BERT on several GPU nodes with torchrun (NCCL): run this same command on every node.
#
#   # node 0 (its address is MASTER_ADDR), 4 nodes x 8 GPUs = 32 GPUs: TP=4 x DP=2 within a node, PP=4 across nodes
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/pretrain_multinode.sh
#   # nodes 1..3: the same with NODE_RANK=1, 2, 3
#
# Layout: Megatron-LM's rank order, tp innermost, then dp, then pp outermost (rank = (pp * DP + dp) * TP + tp), and
# torchrun gives node n the ranks n*8 .. n*8+7. With the defaults TP=4 PP=4 (DP = 32 / 16 = 2) each node holds one
# pipeline stage: its two tensor-parallel groups of 4 GPUs (NVLink) and its data-parallel pairs are inside the node,
# and only the pipeline's point-to-point activation sends cross nodes (tests/test_rank_order.py checks this
# layout). A node holds whole tp x dp blocks only when TP x DP divides the GPUs per node: at TP=4 PP=2 (DP=4) each
# data-parallel group spans 2 nodes, and with --use-tp-pp-dp-mapping (dp outermost) it spans all 4. The run logs
# how many nodes each group spans. dp is inferred: NNODES x NPROC_PER_NODE / (TP x PP). Data must be on a
# filesystem every node sees (DATA_PREFIX or INPUT), as must OUTPUT_DIR (checkpoints are written by dp rank 0 of
# every tp/pp coordinate, the distributed optimizer's shards by every dp rank, and renamed by global rank 0).
# Defaults: MODEL=base (BERT-base: 12 layers, hidden 768, 12 heads, seq 512), global batch 1024, bf16 (bf16
# parameters, float32 main parameters), the distributed optimizer (AdamW state and main parameters sharded over
# the 2 dp ranks: 12 instead of 18 bytes per parameter on each GPU), overlapped gradient reduce-scatter.
# Extra arguments go to pretrain/pretrain_protein_bert.py (Megatron-LM flags).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}" \
  "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
export NNODES NODE_RANK MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-29500}"
export MODEL="${MODEL:-base}" TP="${TP:-4}" PP="${PP:-4}" NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
export INPUT="${INPUT:-$REPO_ROOT/data/pfam/pfam_sample.fasta}"
export OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/pfam_${MODEL}_multinode}"
# Best: preprocess once beforehand and pass DATA_PREFIX. Otherwise node 0 preprocesses INPUT into the shared
# OUTPUT_DIR/data cache and the other nodes wait for its completion stamp (DATA_WAIT_SECONDS, default 3600).
exec bash "$REPO_ROOT/scripts/pretrain_pfam.sh" --bf16 --use-distributed-optimizer --overlap-grad-reduce "$@"
