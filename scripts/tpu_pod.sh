#!/usr/bin/env bash
# Runs dpo_jax on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a scripts/tpu_pod.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a scripts/tpu_pod.sh train \
#       --config=configs/sdxl.py --workdir=gs://BUCKET/runs/sdxl \
#       --config.pretrained_path=/mnt/models/stable-diffusion-xl-base-1.0 \
#       --config.data.source=cache --config.data.cache_dir=gs://BUCKET/cache/sdxl
#   TPU_NAME=... ZONE=... scripts/tpu_pod.sh logs     # follow host 0's log
#   TPU_NAME=... ZONE=... scripts/tpu_pod.sh stop
#
# Commands:
#   setup            clone (or update) the repo on every host and install it with jax[tpu]
#   train ARGS...    python -m dpo_jax.train --distributed=on ARGS... on every host, in the
#                    background, logging to $REPO_DIR/train.log on each host
#   cache ARGS...    python -m dpo_jax.data.cache --distributed=on ARGS... (hosts split shards)
#   logs             tail -f host 0's train.log
#   stop             kill the training processes on every host
#
# Environment: TPU_NAME, ZONE (required); PROJECT (optional); REPO_URL (setup; default the
# origin of this checkout); REPO_DIR (default dpo_jax, relative to each host's home);
# DRY_RUN=1 prints the gcloud commands instead of running them.
#
# Every host runs the same command; JAX reads the slice topology from the TPU VM metadata.
# The workdir, the latent cache / TFDS folder and the pretrained pipeline must be readable
# by every host: a GCS bucket (gs://...) for the workdir and data, and the pipeline either
# on GCS-fuse / NFS or copied to the same path on every host.
set -euo pipefail

REPO_DIR="${REPO_DIR:-dpo_jax}"
JAX_SPEC="jax[tpu]>=0.10,<0.11"

ssh_cmd() {  # ssh_cmd WORKER COMMAND
  : "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
  : "${ZONE:?set ZONE to the TPU zone}"
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" "--worker=$1" "--command=$2")
  if [[ -n "${PROJECT:-}" ]]; then cmd+=("--project=$PROJECT"); fi
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

quoted() {  # The arguments, shell-quoted for the remote command line.
  if (($#)); then printf ' %q' "$@"; fi
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

command="${1:-}"
shift || true
case "$command" in
  setup)
    url="${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}"
    : "${url:?set REPO_URL to a git URL every host can clone}"
    ssh_cmd all "set -e; if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR pull --ff-only; \
else git clone $(printf %q "$url") $REPO_DIR; fi; \
cd $REPO_DIR && pip install -q -e . '$JAX_SPEC'"
    ;;
  train | cache)
    module=dpo_jax.train
    if [[ "$command" == cache ]]; then module=dpo_jax.data.cache; fi
    ssh_cmd all "cd $REPO_DIR && nohup python -m $module --distributed=on$(quoted "$@") \
> $command.log 2>&1 < /dev/null &"
    ;;
  logs)
    ssh_cmd 0 "tail -n 100 -f $REPO_DIR/train.log"
    ;;
  stop)
    ssh_cmd all "pkill -f '[p]ython -m dpo_jax' || true"  # [p]: not this shell itself.
    ;;
  -h | --help | help) usage 0 ;;
  *) usage 2 ;;
esac
