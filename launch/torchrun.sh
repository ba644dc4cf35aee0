#!/usr/bin/env bash
# One node's share of a multi-node training stage, launched by torchrun. Run it on every node, each with its own
# NODE_RANK, from a checkout with the same commit, params and data:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/torchrun.sh pretrain
#
# params.yaml must agree: <stage>.train.num_nodes = NNODES, devices = processes per node (PROCS_PER_NODE, default
# every GPU here, or 1 without one), strategy ddp or fsdp; and paths.checkpoints a folder every node reaches (a
# shared file system, or s3://...) so that rank zero's checkpoints are every rank's to resume from. Rank zero
# alone writes outputs and tracks to MLflow; run `dvc commit <stage>` on node 0 afterwards to record them.
set -euo pipefail
stage=${1:?usage: launch/torchrun.sh <pretrain|distill|scratch>}
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
exec python -m torch.distributed.run \
    --nnodes "${NNODES:?set NNODES}" --node-rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc-per-node "${PROCS_PER_NODE:-$((gpus > 0 ? gpus : 1))}" \
    --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
    -m "stages.$stage"
