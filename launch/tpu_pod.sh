#!/usr/bin/env bash
# Runs dpo_jax on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a DPO_JAX_SRC=. launch/tpu_pod.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh train \
#       --config=configs/sdxl.py --workdir=gs://BUCKET/runs/sdxl \
#       --config.pretrained_path=/mnt/models/stable-diffusion-xl-base-1.0 \
#       --config.data.source=cache --config.data.cache_dir=gs://BUCKET/cache/sdxl
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh logs     # follow host 0's log
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh stop
#
# Commands:
#   setup            install dpo_jax from DPO_JAX_SRC on every host, with jax[tpu]; each host
#                    gets $REPO_DIR with configs/ (the run directory of train / cache)
#   train ARGS...    python -m dpo_jax.train --distributed=on ARGS... on every host, in the
#                    background, logging to $REPO_DIR/train.log on each host
#   cache ARGS...    python -m dpo_jax.data.cache --distributed=on ARGS... (hosts split shards)
#   logs             tail -f host 0's train.log
#   stop             kill the training processes on every host
#
# Environment: TPU_NAME, ZONE (required); PROJECT (optional); REPO_DIR (default dpo_jax,
# relative to each host's home); DRY_RUN=1 prints the commands instead of running them.
# DPO_JAX_SRC (setup): what to install, one of
#   a local clone (e.g. `.`)  its committed HEAD (git archive) is copied to every host
#   a git URL                 every host clones it (or pulls, if $REPO_DIR is a clone already)
#   a wheel (.whl)            a local file is copied to every host; a URL is fetched by pip
# (default: the `origin` remote of this checkout, when it has one).
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
  run_local "${cmd[@]}"
}

scp_cmd() {  # scp_cmd LOCAL_FILE REMOTE_NAME: copies a file to every host's home.
  : "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
  : "${ZONE:?set ZONE to the TPU zone}"
  local cmd=(gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "--zone=$ZONE" --worker=all)
  if [[ -n "${PROJECT:-}" ]]; then cmd+=("--project=$PROJECT"); fi
  run_local "${cmd[@]}"
}

run_local() {  # Runs a command on this machine, or prints it under DRY_RUN.
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
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
    src="${DPO_JAX_SRC:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}"
    if [[ -z "$src" ]]; then
      echo "error: set DPO_JAX_SRC to a local clone, a git URL or a .whl (see --help)" >&2
      exit 2
    fi
    install="pip install -q -e . '$JAX_SPEC'"
    if [[ -d "$src" ]]; then
      if ! git -C "$src" rev-parse --git-dir > /dev/null 2>&1; then
        echo "error: DPO_JAX_SRC=$src is a folder but not a git clone" >&2
        exit 2
      fi
      archive="$(mktemp -d)/dpo_jax_src.tar.gz"
      run_local git -C "$src" archive --format=tar.gz -o "$archive" HEAD
      scp_cmd "$archive" dpo_jax_src.tar.gz
      rm -r "$(dirname "$archive")"
      ssh_cmd all "set -e; mkdir -p $REPO_DIR && tar -xzf dpo_jax_src.tar.gz -C $REPO_DIR; \
cd $REPO_DIR && $install"
    elif [[ "$src" == *.whl ]]; then
      remote="$src"
      if [[ -f "$src" ]]; then
        remote="./$(basename "$src")"
        scp_cmd "$src" "$remote"
      elif [[ "$src" != *://* ]]; then
        echo "error: DPO_JAX_SRC=$src: no such wheel file" >&2
        exit 2
      fi
      # The wheel holds the configs package: copy its files to $REPO_DIR/configs, so that
      # train / cache run there with --config=configs/NAME.py as from a clone.
      ssh_cmd all "set -e; pip install -q $(printf %q "$remote") '$JAX_SPEC'; mkdir -p $REPO_DIR; \
python -c 'import configs, os, shutil; shutil.copytree(os.path.dirname(configs.__file__), \
\"$REPO_DIR/configs\", dirs_exist_ok=True)'"
    else
      ssh_cmd all "set -e; if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR pull --ff-only; \
else git clone $(printf %q "$src") $REPO_DIR; fi; cd $REPO_DIR && $install"
    fi
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
