#!/usr/bin/env bash
# Stops the local test cluster started by up.sh (daemons only; munged is left for other users).
STATE=${DIST_GLM_SLURM_STATE:-/tmp/dist_glm_slurm}
for f in "$STATE"/slurmd-*.pid "$STATE"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
sleep 1
pkill -f "slurmd -f $STATE/slurm.conf" 2>/dev/null
pkill -f "slurmctld -f $STATE/slurm.conf" 2>/dev/null
rm -rf "$STATE"/ctld/* 2>/dev/null
exit 0
