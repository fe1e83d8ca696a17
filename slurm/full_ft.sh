#!/bin/bash
# Full-parameter fine-tuning of GLM on any number of nodes.
#   sbatch slurm/full_ft.sh configs/glm4_9b_full.yaml --learning_rate=1e-5
#   sbatch --nodes=4 slurm/full_ft.sh configs/glm4_9b_full.yaml
# Submit from the repository root. Arguments after the script go to launch/train.py.
#SBATCH --job-name=glm-full
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # one task per GPU: keep equal to --gpus-per-node
#SBATCH --gpus-per-node=8            # no GPU GRES here? sbatch --gpus-per-node=0 [--gres=gpu:8] (docs/cluster.md)
#SBATCH --cpus-per-task=8
#SBATCH --exclusive                  # whole nodes: every rank's CPUs and the host RAM of model loading
#SBATCH --mem=0                      # all of each node's memory, whatever the site's DefMemPerCPU
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600            # 10 min before the limit: checkpoint, exit, requeue (lead time: docs/cluster.md)
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued run appends to the same log
#SBATCH --output=slurm-%x-%j.log
##SBATCH --partition=gpu             # cluster settings: uncomment and set
##SBATCH --account=my-account

# ---- cluster settings -------------------------------------------------------------------------
MODULES=""                           # e.g. "cuda/12.4 nccl"
ENV_SETUP="source .venv/bin/activate"
# export NCCL_SOCKET_IFNAME=ib0      # the interface between nodes
# export NCCL_IB_HCA=mlx5
# export NCCL_DEBUG=WARN
# ------------------------------------------------------------------------------------------------
METHOD_ARGS="--finetuning_type=full"           # the ZeRO config comes from the recipe (deepspeed: ...), or add --deepspeed=...
source "${DIST_GLM_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
