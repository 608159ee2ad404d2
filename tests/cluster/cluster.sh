#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the cluster tests (tests/cluster/test_*.py).
#
#   tests/cluster/cluster.sh test [pytest args]   up, run the cluster tests, down (what `make test-cluster` does)
#   tests/cluster/cluster.sh up                   install what is missing, start the daemons, wait for the node
#   tests/cluster/cluster.sh env                  the exports that point slurm's commands at this cluster
#   tests/cluster/cluster.sh status | down
#
# Debian 12's slurm-wlm 22.05 + munge (+ slurmdbd and MariaDB for job accounting, so `sacct` -- which
# submitit reads for a job's state -- is the real one), all run as root without systemd or cgroups, with
# private configuration, state, database and ports: nothing in /etc/slurm is used or changed. munge: slurm's
# clients (sacctmgr) only talk to munge's default socket, /run/munge/munge.socket.2; a munged already
# answering there is used as it is, otherwise this script starts one there (with a private key).
#
# Every daemon this script starts has a PID file under $W/pids; `down` stops exactly those PIDs (after
# checking each is still the binary it started) and nothing else.
#
# Environment:
#   SR_CLUSTER_DIR         working folder (configs, logs, state, PID files) [<repo>/.cache/slurm-cluster]
#   SR_CLUSTER_ACCOUNTING  slurmdbd (MariaDB + slurmdbd, the real sacct) | shim (no database: a `sacct` that
#                          answers from slurmctld's memory; jobs are remembered MinJobAge=600 s) [slurmdbd]
#   SR_CLUSTER_PORT        first of four TCP ports: slurmctld, slurmd, slurmdbd, MariaDB [6817]
#   SR_CLUSTER_NO_INSTALL  1: never call apt-get (fail when packages are missing)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
W=${SR_CLUSTER_DIR:-$REPO/.cache/slurm-cluster}
ACCOUNTING=${SR_CLUSTER_ACCOUNTING:-slurmdbd}
PORT=${SR_CLUSTER_PORT:-6817}
CTLD_PORT=$PORT; SLURMD_PORT=$((PORT + 1)); DBD_PORT=$((PORT + 2)); DB_PORT=$((PORT + 3))
CLUSTER=srtest
PARTITION=cpu
NODE=$(hostname -s)
PKGS=(slurmctld slurmd slurm-client munge)
DB_PKGS=(slurmdbd mariadb-server)

say() { printf '[cluster] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# unix sockets have a 108-byte path limit: keep the runtime folder short
if [ ${#W} -gt 60 ]; then W=/tmp/sr-slurm-$(printf '%s' "$W" | md5sum | cut -c1-8); fi
RUN=$W/run; LOG=$W/log; PIDS=$W/pids; ETC=$W/etc; BIN=$W/bin

# ---- install -----------------------------------------------------------------------------------------
missing() {
  local m=() b
  for b in slurmctld slurmd sinfo sbatch munged; do command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || m+=("$b"); done
  if [ "$ACCOUNTING" = slurmdbd ]; then
    for b in slurmdbd mariadbd mariadb-install-db sacctmgr; do command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || m+=("$b"); done
  fi
  printf '%s\n' "${m[@]}"
}

install() {
  local need; need=$(missing)
  [ -z "$need" ] && return 0
  say "missing: $(echo $need | tr '\n' ' ')"
  [ "${SR_CLUSTER_NO_INSTALL:-0}" = 1 ] && die "SR_CLUSTER_NO_INSTALL=1 and packages are missing"
  [ "$(id -u)" = 0 ] || die "installing needs root: apt-get install ${PKGS[*]} ${DB_PKGS[*]}"
  command -v apt-get >/dev/null || die "no apt-get here: install ${PKGS[*]} ${DB_PKGS[*]} with this system's package manager"
  local pkgs=("${PKGS[@]}"); [ "$ACCOUNTING" = slurmdbd ] && pkgs+=("${DB_PKGS[@]}")
  local t0=$SECONDS
  say "apt-get install ${pkgs[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$W/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$W/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$W/apt.log" 2>&1 \
      || die "apt-get install failed (see $W/apt.log)"
  fi
  say "installed in $((SECONDS - t0)) s"
}

# ---- processes ---------------------------------------------------------------------------------------
# start NAME BINARY ARGS...: runs BINARY in the foreground mode of the daemon, detached, PID in $PIDS/NAME.pid
start() {
  local name=$1; shift
  setsid "$@" >"$LOG/$name.out" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
  echo "$1" >"$PIDS/$name.bin"
}

alive() {  # alive NAME: its recorded PID runs its recorded binary
  local name=$1 pid bin
  [ -f "$PIDS/$name.pid" ] || return 1
  pid=$(cat "$PIDS/$name.pid"); bin=$(cat "$PIDS/$name.bin" 2>/dev/null || echo '?')
  [ -n "$pid" ] && [ -e "/proc/$pid" ] || return 1
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$bin")" ] || return 1
  ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

stop() {  # stop NAME: TERM its PID (only if it is still the binary started), KILL after 20 s
  local name=$1 pid i
  [ -f "$PIDS/$name.pid" ] || return 0
  pid=$(cat "$PIDS/$name.pid")
  if alive "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do alive "$name" || break; sleep 0.5; done
    if alive "$name"; then say "$name (pid $pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$PIDS/$name.pid" "$PIDS/$name.bin"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && return 1
    sleep 0.5
  done
}

# ---- configuration -----------------------------------------------------------------------------------
write_configs() {
  mkdir -p "$RUN" "$LOG" "$PIDS" "$ETC" "$BIN" "$W/state/ctld" "$W/state/slurmd"
  chmod 700 "$RUN"
  if [ ! -s "$ETC/munge.key" ]; then
    dd if=/dev/urandom of="$ETC/munge.key" bs=1 count=1024 status=none
  fi
  chmod 600 "$ETC/munge.key"

  # what this machine offers (slurmd -C), less 512 MB for the daemons; one partition, one node
  local spec cpus mem
  spec=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$spec")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$spec"); mem=$((mem > 2048 ? mem - 512 : mem))
  local topo; topo=$(sed -n 's/.*\(Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*\).*/\1/p' <<<"$spec")

  local acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  if [ "$ACCOUNTING" = slurmdbd ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5"
  fi
  cat >"$ETC/slurm.conf" <<EOF
# written by tests/cluster/cluster.sh: a one-node test cluster
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$W/state/ctld
SlurmdSpoolDir=$W/state/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here: plain process tracking, no containment (so no OOM kills by slurm either)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$acct
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
# seconds between SIGTERM and SIGKILL at a time limit or scancel
KillWait=10
OverTimeLimit=0
MinJobAge=600
Waittime=0
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
EOF
  if [ "$ACCOUNTING" = slurmdbd ]; then
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm-test
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
  fi

  # the sacct stand-in (shim mode only): answers `sacct [-X] [-P|--parsable2] [-o FIELDS] -j ID ...` (submitit
  # asks for JobID,State,NodeList) from slurmctld's memory, so a job that dies without a result is seen as dead
  # instead of waited on forever. Fields: JobID JobName State NodeList Start End ExitCode Elapsed Timelimit Reason
  cat >"$BIN/sacct-shim" <<'EOF'
#!/bin/bash
ids=(); fields="JobID,JobName,State,NodeList,Start,End,ExitCode,Elapsed"
while [ $# -gt 0 ]; do case "$1" in -j|--jobs) ids+=("$2"); shift 2;; -o|--format) fields=$2; shift 2;; *) shift;; esac; done
echo "${fields//,/|}"
for arg in "${ids[@]}"; do for id in ${arg//,/ }; do
  scontrol -o show job "$id" 2>/dev/null | while read -r line; do
    declare -A kv=()
    for tok in $line; do [[ $tok == *=* ]] && kv[${tok%%=*}]=${tok#*=}; done
    jid=${kv[JobId]}; [ -n "${kv[ArrayJobId]:-}" ] && jid="${kv[ArrayJobId]}_${kv[ArrayTaskId]}"
    out=()
    for f in ${fields//,/ }; do
      case "$f" in
        JobID) out+=("$jid");; JobName) out+=("${kv[JobName]:-}");; State) out+=("${kv[JobState]:-}");;
        NodeList) out+=("${kv[NodeList]:-}");; Start) out+=("${kv[StartTime]:-}");; End) out+=("${kv[EndTime]:-}");;
        ExitCode) out+=("${kv[ExitCode]:-}");; Elapsed) out+=("${kv[RunTime]:-}");; Timelimit) out+=("${kv[TimeLimit]:-}");;
        Reason) out+=("${kv[Reason]:-}");; *) out+=("");;
      esac
    done
    (IFS='|'; echo "${out[*]}")
  done
done; done
EOF
  chmod +x "$BIN/sacct-shim"
  rm -f "$BIN/sacct"
  [ "$ACCOUNTING" = shim ] && ln -s sacct-shim "$BIN/sacct"

  {
    echo "export SLURM_CONF=$ETC/slurm.conf"
    echo "export SR_CLUSTER_PARTITION=$PARTITION"
    echo "export SR_CLUSTER_ACCOUNTING=$ACCOUNTING"
    echo "export SR_CLUSTER_DIR=$W"
    [ "$ACCOUNTING" = shim ] && echo "export PATH=$BIN:\$PATH"
    true
  } >"$W/env.sh"
}

# ---- up / down ---------------------------------------------------------------------------------------
start_db() {
  local sql="$RUN/mysqld.sock"
  if alive slurmdbd; then return 0; fi
  if alive mariadbd; then :; else
  if [ ! -d "$W/db/mysql" ]; then
    rm -rf "$W/db"
    mariadb-install-db --no-defaults --user=root --datadir="$W/db" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  start mariadbd "$(command -v mariadbd || echo /usr/sbin/mariadbd)" --no-defaults --user=root --datadir="$W/db" \
    --socket="$sql" --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" \
    --log-error="$LOG/mariadbd.err" --skip-log-bin --innodb-buffer-pool-size=32M --innodb-log-file-size=16M
  wait_for 60 mariadb mariadb --no-defaults -S "$sql" -u root -e 'select 1' \
    || die "MariaDB did not start (see $LOG/mariadbd.err)"
  fi
  mariadb --no-defaults -S "$sql" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-test';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-test';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  say "MariaDB up (port $DB_PORT)"
  start slurmdbd "$(command -v slurmdbd || echo /usr/sbin/slurmdbd)" -D  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 60 slurmdbd sacctmgr -n list cluster || die "slurmdbd did not answer (see $LOG/slurmdbd.log)"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  say "slurmdbd up (port $DBD_PORT)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_idle() { sinfo -h -p "$PARTITION" -o '%T' 2>/dev/null | grep -qE '^(idle|mixed)'; }

up() {
  mkdir -p "$W"
  if alive slurmctld && alive slurmd && SLURM_CONF=$ETC/slurm.conf node_idle; then say "already up ($W)"; return 0; fi
  local t0=$SECONDS
  install
  write_configs
  export SLURM_CONF=$ETC/slurm.conf
  [ "$ACCOUNTING" = shim ] && export PATH=$BIN:$PATH

  if munge_ok; then
    alive munged && say "munged up (pid $(cat "$PIDS/munged.pid"))" || say "using the munged already running"
  else
    mkdir -p /run/munge && chmod 755 /run/munge
    start munged "$(command -v munged || echo /usr/sbin/munged)" --foreground --force \
      --key-file="$ETC/munge.key" --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
      --seed-file="$RUN/munged.seed"
    wait_for 20 munge munge_ok || die "munged did not start (see $LOG/munged.out, $LOG/munged.log)"
    say "munged up"
  fi
  if [ "$ACCOUNTING" = slurmdbd ]; then start_db; fi

  alive slurmctld || start slurmctld "$(command -v slurmctld || echo /usr/sbin/slurmctld)" -D -i -f "$ETC/slurm.conf"
  wait_for 30 slurmctld scontrol ping || die "slurmctld did not answer (see $LOG/slurmctld.log)"
  alive slurmd || start slurmd "$(command -v slurmd || echo /usr/sbin/slurmd)" -D -f "$ETC/slurm.conf"
  if ! wait_for 60 node node_idle; then
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    wait_for 30 node node_idle || { sinfo >&2 || true; die "the node did not become idle (see $LOG/slurmd.log)"; }
  fi
  say "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %a %D %T %N %c cpus %m MB' | head -1); accounting: $ACCOUNTING"
  say "use it:  source $W/env.sh"
}

down() {
  [ -d "$PIDS" ] || { say "nothing started here ($W)"; return 0; }
  local n
  for n in slurmd slurmctld slurmdbd mariadbd munged; do stop "$n"; done
}

status() {
  local n
  for n in munged mariadbd slurmdbd slurmctld slurmd; do
    if alive "$n"; then echo "$n: running (pid $(cat "$PIDS/$n.pid"))"; else echo "$n: not running"; fi
  done
  if [ -f "$ETC/slurm.conf" ]; then SLURM_CONF=$ETC/slurm.conf sinfo 2>&1 || true; fi
}

run_tests() {
  local started=0
  if ! (alive slurmctld && alive slurmd); then started=1; fi
  [ $started = 1 ] && trap 'down' EXIT
  up
  # shellcheck disable=SC1091
  source "$W/env.sh"
  export SR_CLUSTER_TESTS=1 WANDB_MODE=disabled
  local py=${PYTHON:-$REPO/.venv/bin/python}
  local t0=$SECONDS rc=0
  # a private basetemp: other pytest runs on this machine prune /tmp/pytest-of-$USER while jobs still use it
  (cd "$REPO" && "$py" -m pytest -m cluster --basetemp="$W/pytest" tests/cluster "$@") || rc=$?
  say "cluster tests: rc=$rc in $((SECONDS - t0)) s"
  return $rc
}

cmd=${1:-help}; shift || true
case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) cat "$W/env.sh" ;;
  install) mkdir -p "$W"; install ;;
  test) run_tests "$@" ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
