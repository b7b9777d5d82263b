#!/usr/bin/env bash
# Run a sajax command on every worker of a Cloud TPU VM pod slice (multi-host JAX).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE            # copy this checkout to all workers and pip-install it
#   launch/tpu_pod.sh run   TPU_NAME ZONE -- CMD...  # run CMD on all workers at once
#
# Every worker runs the same program; SAJAX_DISTRIBUTED=1 makes the CLIs call jax.distributed.initialize(),
# which finds the coordinator from the TPU metadata. Needs the gcloud CLI, authenticated.
set -euo pipefail
action="${1:?usage: $0 setup|run TPU_NAME ZONE [-- CMD...]}"
tpu="${2:?TPU_NAME missing}"
zone="${3:?ZONE missing}"
shift 3
remote_dir="${SAJAX_REMOTE_DIR:-sajax}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }

case "$action" in
  setup)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    archive="$(mktemp --suffix=.tar.gz)"
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$tpu:sajax.tar.gz" --zone "$zone" --worker=all
    ssh_all "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf sajax.tar.gz -C $remote_dir && \
             cd $remote_dir && pip install -q . 'jax[tpu]==0.10.2'"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || { echo "usage: $0 run TPU_NAME ZONE -- CMD..." >&2; exit 2; }
    ssh_all "cd $remote_dir && SAJAX_DISTRIBUTED=1 $(printf '%q ' "$@")"
    ;;
  *)
    echo "unknown action $action (setup|run)" >&2; exit 2 ;;
esac
