#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests: munge, MariaDB + slurmdbd (so sacct works, as
# submitit needs), slurmctld and slurmd, all as root, every file under one folder. Stopped by PID.
#
#   slurm/test-cluster.sh install            # Debian packages (needs root and the package registry)
#   slurm/test-cluster.sh start [DIR]        # prints `export SLURM_CONF=DIR/slurm.conf`
#   slurm/test-cluster.sh stop [DIR]
set -euo pipefail
cmd=${1:?usage: test-cluster.sh install|start|stop [DIR]}
dir=${2:-/tmp/pcsweep-slurm}
export SLURM_CONF=$dir/slurm.conf

wait_for() {  # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "test-cluster: timed out waiting for: $*" >&2; return 1; fi
    sleep 0.3
  done
}

case $cmd in
install)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
  ;;
start)
  mkdir -p "$dir"/{state,spool,log,db,run}
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(($(free -m | awk '/Mem:/{print $2}') - 2048))
  # munge: the package's key, our own socket and pid
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  mkdir -p /run/munge
  # the default socket (/run/munge/munge.socket.2): every SLURM client finds it without configuration
  munged --force --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log"
  # MariaDB for slurmdbd, on a private port and socket
  mariadb-install-db --user=root --datadir="$dir/db" --auth-root-authentication-method=normal >"$dir/log/db-init.log"
  (mariadbd --user=root --datadir="$dir/db" --socket="$dir/run/db.sock" --pid-file="$dir/run/db.pid" \
    --bind-address=127.0.0.1 --port=13306 --skip-name-resolve --log-error="$dir/log/mariadb.log" &)
  wait_for 60 mariadb -S "$dir/run/db.sock" -e "SELECT 1"
  mariadb -S "$dir/run/db.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat >"$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=13306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
CONF
  chmod 600 "$dir/slurmdbd.conf"
  cat >"$dir/slurm.conf" <<CONF
ClusterName=pcsweep-test
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  slurmdbd
  wait_for 60 sacctmgr -i show cluster
  sacctmgr -i add cluster pcsweep-test >/dev/null 2>&1 || true
  slurmctld
  slurmd
  wait_for 60 bash -c "sinfo -h -o %T | grep -q idle"
  echo "export SLURM_CONF=$SLURM_CONF"
  ;;
stop)
  for name in slurmd slurmctld slurmdbd db munged; do
    pidfile=$dir/run/$name.pid
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  sleep 1
  ;;
*)
  echo "usage: test-cluster.sh install|start|stop [DIR]" >&2
  exit 2
  ;;
esac
