#!/usr/bin/env bash
# A real Slurm cluster on this one machine (munged + slurmctld + one slurmd per node, Debian's
# slurm-wlm), so launch/slurm.sbatch can be run for real without a cluster (benchmarks/launch_check.sh).
# Hardware: one Linux machine (Debian/Ubuntu), root; no GPU. Every node gets all of this machine's
#   CPUs (with SLURM_LOCAL_NODES=2 the two nodes share them: multi-node runs, not more compute).
# Time: install ~30 s (apt, once); start <1 s; stop ~1 s.
# Run:  bash launch/local-slurm.sh install                  (apt-get install slurm-wlm munge; root)
#       [SLURM_LOCAL_NODES=2] bash launch/local-slurm.sh start|status|stop     (root)
#       then, in the shell that submits: export SLURM_CONF=/tmp/saeworks-slurm/slurm.conf
# Everything (slurm.conf, munge key and socket, state, logs) lives in SLURM_LOCAL_DIR (default
# /tmp/saeworks-slurm); /etc/slurm and a system munged are never touched, and the ports are its own
# (SlurmctldPort 16817, slurmd 16818 and up). Nodes are saeworks0, saeworks1, ... at 127.0.0.1,
# each a slurmd of its own (`slurmd -N`). No cgroups (proctrack/linuxproc, task/none): they work
# in containers and VMs alike. Accounting is off, as sacct needs slurmdbd and a MySQL/MariaDB
# server: `sacct` answers "Slurm accounting storage is disabled"; finished jobs are recorded one
# line each (state, exit code, times) by jobcomp/filetxt in $SLURM_LOCAL_DIR/jobcomp.log, and
# `scontrol show job` keeps them for 10 minutes.
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/saeworks-slurm}
CONF=$DIR/slurm.conf
CPUS=$(nproc)
die() { echo "launch/local-slurm.sh: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (slurmd starts job steps as their user)"; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
nodes() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF" 2>/dev/null; }  # the running cluster's nodes

install_packages() {
  need_root
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "launch/local-slurm.sh: $(slurmctld -V) and munge are installed"; return
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  echo "launch/local-slurm.sh: installed $(slurmctld -V)"
}

write_config() {
  local n=${SLURM_LOCAL_NODES:-1} i names=""
  [[ $n =~ ^[1-9][0-9]?$ ]] || die "SLURM_LOCAL_NODES must be 1 to 99, got '$n'"
  mkdir -p "$DIR/state" "$DIR/munge"
  chmod 0755 "$DIR" "$DIR/munge"  # munged wants its socket directory searchable by all
  [ -s "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$DIR/munge/munge.key"
  cat >"$CONF" <<EOF
# Written by launch/local-slurm.sh: $n node(s) on $(hostname -s), $CPUS CPUs each, root daemons.
ClusterName=saeworks-local
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmctldPort=16817
# The nodes share this machine's CPUs: let each declare all of them.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
EOF
  for ((i = 0; i < n; i++)); do
    echo "NodeName=saeworks$i NodeHostname=saeworks$i NodeAddr=127.0.0.1 Port=$((16818 + i))" \
      "CPUs=$CPUS State=UNKNOWN" >>"$CONF"
    mkdir -p "$DIR/spool-saeworks$i"
    names+=${names:+,}saeworks$i
  done
  echo "PartitionName=local Nodes=$names Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

start() {
  need_root
  command -v slurmctld >/dev/null || die "slurm is not installed: bash launch/local-slurm.sh install"
  if pid_alive "$DIR/slurmctld.pid"; then
    echo "launch/local-slurm.sh: already running ($CONF)"; status; return
  fi
  write_config
  if ! pid_alive "$DIR/munge/munged.pid"; then
    munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
      --seed-file="$DIR/munge/munged.seed"
  fi
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  local node idle=0
  for node in $(nodes); do slurmd -f "$CONF" -N "$node"; done
  for _ in $(seq 60); do  # the nodes register within a few seconds
    idle=$(sinfo -h -t idle -o %D 2>/dev/null || true)
    [ "${idle:-0}" -eq "$(nodes | wc -l)" ] && break
    sleep 0.5
  done
  if [ "${idle:-0}" -ne "$(nodes | wc -l)" ]; then
    tail -n 20 "$DIR"/slurmctld.log "$DIR"/slurmd-*.log >&2 || true
    die "only ${idle:-0} of $(nodes | wc -l) node(s) idle after 30 s (logs above, in $DIR)"
  fi
  echo "launch/local-slurm.sh: running; in the shell that submits: export SLURM_CONF=$CONF"
  status
}

stop() {
  local pidfile pid
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if pid_alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      ! kill -0 "$pid" 2>/dev/null || die "$(basename "$pidfile" .pid) ($pid) did not stop"
    fi
    rm -f "$pidfile"
  done
  echo "launch/local-slurm.sh: stopped (state and logs stay in $DIR; rm -rf it to forget jobs)"
}

status() {
  local pidfile
  for pidfile in "$DIR/munge/munged.pid" "$DIR/slurmctld.pid" "$DIR"/slurmd-*.pid; do
    [ -e "$pidfile" ] || continue
    if pid_alive "$pidfile"; then echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
    else echo "$(basename "$pidfile" .pid): not running"; fi
  done
  if pid_alive "$DIR/slurmctld.pid"; then SLURM_CONF=$CONF sinfo -N -o "%N %P %T %c"
  else echo "slurmctld: not running"; fi
}

case ${1:-} in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: [SLURM_LOCAL_NODES=N] bash launch/local-slurm.sh install|start|status|stop" ;;
esac
