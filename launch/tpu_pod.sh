#!/usr/bin/env bash
# Run a sajax command on every worker (host) of a Cloud TPU VM pod slice: one process per host, multi-host JAX.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE [--dry-run]                      copy this checkout to every worker, install
#   launch/tpu_pod.sh run   TPU_NAME ZONE [--dry-run] [--hosts N] -- CMD...   run CMD on every worker at once
#
# --dry-run prints, for every host, the exact command it will run and the environment it gets, and runs nothing
# (no gcloud call: give --hosts). Each host's output goes to logs/<run id>/host-<i>.log here (SAJAX_LOG_DIR to
# change logs/, SAJAX_RUN_ID to name the run). Every host gets SAJAX_DISTRIBUTED=1 (the CLIs join the job;
# jax finds the coordinator and its process id from the TPU metadata) and SAJAX_EXPECTED_PROCESSES=N: at start
# each process checks that N processes joined and that all run the same sajax sources and the same command
# (sajax.distributed), and stops with a message naming the odd one otherwise. Needs the gcloud CLI, authenticated.
set -euo pipefail
usage="usage: $0 setup|run TPU_NAME ZONE [--dry-run] [--hosts N] [-- CMD...]"
action="${1:?$usage}"
tpu="${2:?$usage}"
zone="${3:?$usage}"
shift 3
dry_run=0
hosts=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --hosts) hosts="${2:?--hosts needs a number}"; shift 2 ;;
    *) echo "unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
[[ "${1:-}" == "--" ]] && shift
remote_dir="${SAJAX_REMOTE_DIR:-sajax}"
run_id="${SAJAX_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}"
log_dir="${SAJAX_LOG_DIR:-logs}/$run_id"

# How a command reaches one worker (or, with "all", every worker at once).
ssh_cmd() { printf '%q ' gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "--worker=$1" --command "$2"; }

case "$action" in
  setup)
    [[ $# -eq 0 ]] || { echo "setup takes no command; $usage" >&2; exit 2; }
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    archive="${TMPDIR:-/tmp}/sajax-$run_id.tar.gz"
    install="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf sajax.tar.gz -C $remote_dir && cd $remote_dir && pip install -q . 'jax[tpu]==0.10.2'"
    commands=("git -C $(printf '%q' "$repo") archive --format=tar.gz -o $(printf '%q' "$archive") HEAD"
              "$(printf '%q ' gcloud compute tpus tpu-vm scp "$archive" "$tpu:sajax.tar.gz" --zone "$zone" --worker=all)"
              "$(ssh_cmd all "$install")")
    for command in "${commands[@]}"; do
      if [[ $dry_run -eq 1 ]]; then echo "$command"; else eval "$command"; fi
    done
    ;;
  run)
    [[ $# -gt 0 ]] || { echo "run needs a command after --; $usage" >&2; exit 2; }
    if [[ -z "$hosts" ]]; then
      [[ $dry_run -eq 0 ]] || { echo "--dry-run needs --hosts N (it calls no gcloud)" >&2; exit 2; }
      hosts="$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" \
               --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .)"
    fi
    [[ "$hosts" =~ ^[1-9][0-9]*$ ]] || { echo "--hosts must be a positive number, got '$hosts'" >&2; exit 2; }
    environment="SAJAX_DISTRIBUTED=1 SAJAX_EXPECTED_PROCESSES=$hosts SAJAX_RUN_ID=$run_id"
    remote="cd $remote_dir && env $environment $(printf '%q ' "$@")"
    if [[ $dry_run -eq 1 ]]; then
      echo "# run $run_id: $hosts hosts of $tpu ($zone); logs in $log_dir/"
      for ((i = 0; i < hosts; i++)); do
        echo "host $i env: $environment"
        echo "host $i on the host: $remote"
        echo "host $i runs: $(ssh_cmd "$i" "$remote")> $log_dir/host-$i.log 2>&1"
      done
      exit 0
    fi
    mkdir -p "$log_dir"
    pids=()
    for ((i = 0; i < hosts; i++)); do
      eval "$(ssh_cmd "$i" "$remote")" > "$log_dir/host-$i.log" 2>&1 &
      pids+=($!)
    done
    failed=()
    for ((i = 0; i < hosts; i++)); do
      wait "${pids[$i]}" || failed+=("$i")
    done
    if [[ ${#failed[@]} -gt 0 ]]; then
      echo "hosts ${failed[*]} failed; see $log_dir/host-<i>.log" >&2
      exit 1
    fi
    echo "all $hosts hosts finished; logs in $log_dir/"
    ;;
  *)
    echo "unknown action $action; $usage" >&2; exit 2 ;;
esac
