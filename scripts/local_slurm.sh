#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for the integration tests and for trying
# `hydra/launcher=slurm` without a cluster. Needs root and Debian's packages (installed here if
# missing); idempotent: daemons already running are left alone.
#   sudo bash scripts/local_slurm.sh && sinfo
# The node gets every CPU of the machine and one partition, "debug". Accounting is off, so
# `sacct` fails and submitit logs "Bypassing sacct error" warnings, harmlessly.
set -euo pipefail
if ! command -v slurmctld >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge /var/spool/slurmctld /var/spool/slurmd /etc/slurm
if [ ! -f /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
host=$(hostname)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=kdexp-local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
# A requeued or cancelled job gets SIGTERM, then SIGKILL this many seconds later (submitit
# ignores SIGTERM, so this is how long a preempted job runs on).
KillWait=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; else slurmctld; fi
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "local_slurm.sh: the node did not come up; see /var/log/slurm*" >&2
sinfo >&2 || true
exit 1
