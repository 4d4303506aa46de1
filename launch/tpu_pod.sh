#!/usr/bin/env bash
# Cloud TPU VM pod (any slice, one host or many): the same command on every worker.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE [PROJECT]
#       copies this working tree to every worker (~/wsss_jax) and installs the package
#       with TPU support and gcsfs in ~/wsss_jax/.venv
#   launch/tpu_pod.sh run TPU_NAME ZONE [PROJECT] -- --config=configs/coco/cam.py \
#       --config.data.root=/mnt/data/coco2014 --workdir=gs://BUCKET/runs/coco_cam
#       runs `wsss --distributed=on ARGS` on all workers at once (jax.distributed finds
#       the pod's coordinator through the TPU metadata server)
#   launch/tpu_pod.sh aot TOPOLOGY -- --config=configs/coco/cam.py
#       compile check for the slice before creating it (runs here, needs libtpu)
#
# The work directory must be visible to every worker: a gs:// bucket (written directly:
# gcsfs for stage files, orbax/tensorstore for checkpoints; the workers' service account
# needs write access) or a Filestore/NFS mount. Each worker writes its share of the CAMs
# and pseudo-labels there and process 0 writes the summaries; `wsss` stops with a clear
# error when it is not shared.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$*"; else "$@"; fi; }
usage() { sed -n '2,20p' "$0"; exit 2; }

cmd="${1:-}"; shift || true
case "$cmd" in
  setup|run)
    [[ $# -ge 2 ]] || usage
    tpu="$1"; zone="$2"; shift 2
    project=()
    if [[ $# -gt 0 && "$1" != "--" ]]; then project=(--project "$1"); shift; fi
    [[ "${1:-}" == "--" ]] && shift
    ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all)
    if [[ "$cmd" == setup ]]; then
      tarball="$(mktemp -d)/wsss_jax.tar.gz"
      run tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf "$tarball" .
      run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:~/wsss_jax.tar.gz" \
        --zone "$zone" "${project[@]}" --worker=all
      run "${ssh[@]}" --command "set -e; mkdir -p ~/wsss_jax && tar -xzf ~/wsss_jax.tar.gz \
-C ~/wsss_jax && cd ~/wsss_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[gcs]' \
'jax[tpu]==0.10.2' && .venv/bin/python -c 'import jax; print(jax.process_count(), jax.devices())'"
    else
      [[ $# -gt 0 ]] || usage
      args=$(printf '%q ' "$@")
      run "${ssh[@]}" --command "cd ~/wsss_jax && .venv/bin/wsss --distributed=on $args"
    fi
    ;;
  aot)
    [[ $# -ge 1 ]] || usage
    topology="$1"; shift
    [[ "${1:-}" == "--" ]] && shift
    run python -m wsss_jax.train.aot --topology="$topology" "$@"
    ;;
  *) usage ;;
esac
