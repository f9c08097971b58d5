#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests of `--executor slurm` (issue #11).
#
# Installs Debian's slurm-wlm and munge when missing, writes slurm.conf for this host's CPUs and
# memory, starts munged, slurmctld and slurmd (all as root: a throwaway test cluster), and waits
# until the node accepts jobs. Idempotent: a cluster already answering is left as it is.
# Needs root (or passwordless sudo). Run by .ci/run before the tests; by hand: sudo tests/slurm/start.sh
set -euo pipefail

log() { echo "slurm/start.sh: $*" >&2; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  log "Slurm is up already: $(sinfo -h -o '%P %D %T %c CPUs')"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge (Debian packages)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: the key the package generated, else a fresh one
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mkdir -p /etc/munge
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
fi
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
$SUDO chmod 0700 /etc/munge && $SUDO chmod 0400 /etc/munge/munge.key
if ! pidof munged >/dev/null; then
  $SUDO runuser -u munge -- /usr/sbin/munged
fi

host=$(hostname -s)
# this host's CPUs, sockets, cores and memory as slurmd sees them, less 1 GiB of memory for the daemons
node=$(slurmd -C | head -n 1 | awk '{
  for (i = 2; i <= NF; i++) {
    if ($i ~ /^RealMemory=/) { m = substr($i, 12); if (m > 2048) m -= 1024; $i = "RealMemory=" m }
    printf "%s%s", $i, (i < NF ? " " : "")
  }
}')
$SUDO mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
$SUDO tee /etc/slurm/slurm.conf >/dev/null <<CONF
# written by tests/slurm/start.sh: a one-node test cluster
ClusterName=backbone-bench
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Slurm's own record of every job (start, end, state), for the tests: no accounting database needed
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=5
NodeName=${host} NodeAddr=127.0.0.1 ${node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
# OverSubscribe: the tests share this machine's cores between several small jobs

start_daemon() {  # name, command...: (re)start with this configuration; on failure show its log and stop
  local name=$1; shift
  if pidof "$name" >/dev/null; then
    $SUDO pkill -x "$name" || true
    for _ in $(seq 20); do pidof "$name" >/dev/null || break; sleep 0.5; done
  fi
  if ! $SUDO "$@"; then
    log "$name failed to start; last lines of /var/log/slurm/$name.log:"
    tail -n 20 "/var/log/slurm/$name.log" >&2 || true
    exit 1
  fi
}
start_daemon slurmctld /usr/sbin/slurmctld -i
start_daemon slurmd /usr/sbin/slurmd

for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    $SUDO scontrol update NodeName="${host}" State=RESUME >/dev/null 2>&1 || true
    log "Slurm is up: $(sinfo -h -o '%P %D %T %c CPUs')"
    exit 0
  fi
  sleep 1
done
log "Slurm did not come up in 60 s; last lines of the logs:"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
