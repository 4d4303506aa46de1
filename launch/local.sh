#!/usr/bin/env bash
# One machine: all local GPUs (or TPU chips) in one process, or N processes on localhost.
#
#   launch/local.sh -- --config=configs/voc/cam.py --config.data.root=DATA --workdir=W
#       one process using every local accelerator (the usual single-node setup)
#   launch/local.sh -n 2 -- --config=... --workdir=W
#       N processes with jax.distributed on localhost (each gets its share of the GPUs
#       through CUDA_VISIBLE_DEVICES when there are GPUs; on CPU set
#       XLA_FLAGS=--xla_force_host_platform_device_count=K for K devices per process).
#       This is how multi-host runs are rehearsed on one machine.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

procs=1
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    -n) procs="$2"; shift 2 ;;
    *) echo "unknown option $1 (use -n N -- ARGS)" >&2; exit 2 ;;
  esac
done
[[ "${1:-}" == "--" ]] && shift
wsss="${WSSS:-wsss}"
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${CUDA_VISIBLE_DEVICES:+CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES }$*"; else "$@"; fi; }

if [[ "$procs" == 1 ]]; then
  run "$wsss" --distributed=off "$@"
  exit
fi
port="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [[ "$gpus" -gt 0 && $((gpus % procs)) -ne 0 ]]; then
  echo "$gpus GPUs do not split evenly over $procs processes" >&2; exit 2
fi
pids=()
for ((i = 0; i < procs; i++)); do
  if [[ "$gpus" -gt 0 ]]; then
    per=$((gpus / procs))
    export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * per)) $((i * per + per - 1)))
  fi
  run "$wsss" --coordinator_address="localhost:$port" --num_processes="$procs" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
