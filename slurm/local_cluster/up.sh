#!/usr/bin/env bash
# A real 2-node Slurm cluster on this one machine, for testing the slurm/ templates (CI runs it; run
# it yourself as root to reproduce). Debian's slurm-wlm is built with MULTIPLE_SLURMD, so two slurmd
# daemons (node1, node2) with their own ports register as two nodes on 127.0.0.1.
#
#   sudo slurm/local_cluster/up.sh            # installs slurm-wlm + munge if needed, starts everything
#   export SLURM_CONF=/tmp/dist_glm_slurm/slurm.conf
#   sbatch --wait --nodes=2 ... slurm/full_ft.sh ...
#   sudo slurm/local_cluster/down.sh
set -euo pipefail
STATE=${DIST_GLM_SLURM_STATE:-/tmp/dist_glm_slurm}
CPUS=${DIST_GLM_SLURM_CPUS:-2}

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    echo "installing slurm-wlm and munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
fi

"$(dirname "$0")/down.sh" >/dev/null 2>&1 || true
mkdir -p "$STATE"/ctld "$STATE"/spool /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chmod 400 /etc/munge/munge.key
munged --force

host=$(hostname -s)
cat > "$STATE/slurm.conf" <<CONF
ClusterName=distglm
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
SlurmdTimeout=60
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=16818 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=16819 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
export SLURM_CONF="$STATE/slurm.conf"
slurmctld -f "$SLURM_CONF"
for n in node1 node2; do mkdir -p "$STATE/spool/$n"; slurmd -f "$SLURM_CONF" -N "$n"; done

for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | grep -c idle)" -ge 1 ] && \
       [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c idle)" -eq 2 ]; then
        echo "slurm cluster up: 2 nodes idle; export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "slurm cluster did not come up; see $STATE/*.log" >&2
sinfo -N >&2 || true
exit 1
