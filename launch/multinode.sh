#!/usr/bin/env bash
# dpo_jax on N machines without a scheduler JAX knows (plain SSH, Kubernetes, ...): run
# this once per machine, each process using all of its machine's accelerators.
#
#   # on machine 0 (its address 10.0.0.1) and, with NODE_RANK=1, on machine 1:
#   COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=0 launch/multinode.sh \
#       --config=configs/sd15.py --workdir=/shared/runs/sd15 ...
#
# Arguments go to `python -m dpo_jax.train` (DPO_JAX_MODULE=dpo_jax.data.cache to build a
# latent cache). COORDINATOR is process 0's host:port, reachable from every machine.
# DRY_RUN=1 prints the command instead.
set -euo pipefail

: "${COORDINATOR:?set COORDINATOR to host:port of the NODE_RANK=0 machine}"
: "${NUM_NODES:?set NUM_NODES to the number of machines}"
: "${NODE_RANK:?set NODE_RANK to the index of this machine, 0..NUM_NODES-1}"

cmd=(python -m "${DPO_JAX_MODULE:-dpo_jax.train}" --distributed=on
  "--coordinator_address=$COORDINATOR" "--num_processes=$NUM_NODES" "--process_id=$NODE_RANK"
  "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
