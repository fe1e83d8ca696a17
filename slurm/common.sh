# Shared body of the slurm/*.sh templates; sourced by them, never submitted itself.
#
# Launch model: srun starts one task per GPU on every node, and each task is one training rank
# (RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS). We chose this over
# "one task per node running the deepspeed launcher with --no_ssh" because Slurm then owns every rank:
# it delivers the preemption signal to each one directly, reports each rank's exit code, kills the
# whole step when one rank dies (--kill-on-bad-exit) instead of leaving the others hanging in a
# collective, and needs no ssh or hostfile.
#
# Expects from the template: METHOD_ARGS (flags for launch/train.py) and the settings block.
# Everything after the template's name on the sbatch command line is passed to launch/train.py.
set -eo pipefail
# `set -u` only after the environment is set up: conda's activate and some Lmod versions read unset
# variables and fail under it.
DIST_GLM_HOME=${DIST_GLM_HOME:-$SLURM_SUBMIT_DIR}
cd "$DIST_GLM_HOME"
if [ -n "${MODULES:-}" ]; then module load $MODULES; fi
eval "${ENV_SETUP:-source .venv/bin/activate}"
set -u

# The head node is the first host of the allocation, reached at the address Slurm itself uses for it
# (NodeAddr; a node name need not resolve in DNS). The port is derived from the job id so that two jobs
# sharing a node do not collide, in 15000-29999: below Linux's ephemeral range (32768-60999 by default,
# /proc/sys/net/ipv4/ip_local_port_range), where outgoing connections take their ports. An exported
# MASTER_PORT wins.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_ADDR=${MASTER_ADDR:-$head_node}
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
export MASTER_ADDR MASTER_PORT
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu  # CPU-only nodes (and the CI's local test cluster)
fi

echo "[slurm] job ${SLURM_JOB_NAME} (${SLURM_JOB_ID}), restart ${SLURM_RESTART_COUNT:-0}:" \
     "nodes ${SLURM_JOB_NODELIST} (${SLURM_JOB_NUM_NODES}), ${SLURM_NTASKS} ranks" \
     "(${SLURM_NTASKS_PER_NODE:-?} per node, GPUs per node: ${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-none}})," \
     "head ${MASTER_ADDR}:${MASTER_PORT}"

# Rank 0 writes this file once the preemption checkpoint is complete (dist_glm.runtime.preemption). The exit
# code alone cannot tell: the first rank to exit makes srun terminate the others.
export DIST_GLM_PREEMPTED_FILE="${SLURM_SUBMIT_DIR}/.dist_glm_preempted_${SLURM_JOB_ID}"
rm -f "$DIST_GLM_PREEMPTED_FILE"
set +e
# --resume_from_checkpoint=auto comes first so that a flag the user passes wins; on a fresh output_dir
# it starts from scratch, after a requeue it continues from the preemption checkpoint.
# srun does not inherit the job's --cpus-per-task on Slurm 22.05-23.02; without it each rank may be
# pinned to one CPU (tokenization and ZeRO-Offload's CPU Adam crawl). Pass it on explicitly.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
srun --kill-on-bad-exit=1 --export=ALL ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec python launch/train.py "$@"' \
    dist_glm --resume_from_checkpoint=auto $METHOD_ARGS "$@"
rc=$?
set -e
if [ -f "$DIST_GLM_PREEMPTED_FILE" ]; then
    rm -f "$DIST_GLM_PREEMPTED_FILE"
    echo "[slurm] preempted; checkpoint saved; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[slurm] training exited with code $rc"
exit "$rc"
