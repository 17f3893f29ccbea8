#!/usr/bin/env bash
# N processes of the trainer on 127.0.0.1, each with a few fake CPU devices: the multi-host
# path (jax.distributed, gloo collectives, one data shard per process, process-0-only logs)
# on one machine. Arguments after N go to every process.
#
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=/tmp/p2p_multihost
#
# Process 0 prints to the terminal; process i logs to $LOG_DIR/process_i.log. Ctrl-C (or a
# SIGTERM to this script) sends SIGTERM to every process: all save at the same step and exit.
#
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               the interpreter (default: .venv/bin/python if present, else python3)
#   LOG_DIR              logs of processes 1..N-1 (default /tmp/p2p_jax_local_multiprocess)
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=configs/<name>.py --workdir=DIR [--config.x=y ...]" >&2
  exit 2
fi
num_processes=$1
shift
cd "$(dirname "$0")/.."
default_python=python3
[[ -x .venv/bin/python ]] && default_python=.venv/bin/python
PYTHON=${PYTHON:-$default_python}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
LOG_DIR=${LOG_DIR:-/tmp/p2p_jax_local_multiprocess}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$LOG_DIR"

# Read by p2p_jax/parallel.py (the --coordinator_address, --num_processes, --process_id flags take precedence).
export P2P_COORDINATOR_ADDRESS=127.0.0.1:$PORT
export P2P_NUM_PROCESSES=$num_processes
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

# Job control puts each process in its own process group, so a Ctrl-C reaches this script
# only, which turns it into the SIGTERM that the trainer handles as a preemption.
set -m
pids=()
for ((i = 0; i < num_processes; i++)); do
  if ((i == 0)); then
    P2P_PROCESS_ID=$i "$PYTHON" -m p2p_jax.main "$@" &
  else
    P2P_PROCESS_ID=$i "$PYTHON" -m p2p_jax.main "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "Started $num_processes processes (${pids[*]}), coordinator 127.0.0.1:$PORT;" \
     "logs of processes 1.. in $LOG_DIR" >&2
trap 'echo "Stopping: SIGTERM to every process." >&2; kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM

status=0
for pid in "${pids[@]}"; do
  while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # Else the wait was cut short by the trap.
  done
  if ((rc != 0)); then
    status=$rc
  fi
done
exit "$status"
