#!/bin/bash
# tunesmith on a Ray cluster: WORKERS Ray Train workers, one GPU each (CPU workers when the
# cluster has no GPUs). See README.md here for the cluster and filesystem it needs.
#
#   WORKERS=8 examples/ray/train.sh my.yaml train.lr=1e-4
#
# Run it on a node of the cluster (the head node is simplest), from the directory the config's
# relative paths start from; arguments after the config go to `tunesmith train`.

set -eu

CONFIG=${1:?usage: train.sh CONFIG [overrides...]}
shift
WORKERS=${WORKERS:-4}   # EDIT: processes, at most the cluster's GPUs

# tunesmith joins the cluster this machine is in (`ray start` here, or RAY_ADDRESS=host:6379);
# with none it would start a private one on this machine only, which this script is not for
if ! ray status >/dev/null 2>&1; then
  echo "no Ray cluster on this machine: start one first (README.md), or run tunesmith directly" >&2
  exit 1
fi

exec tunesmith train "$CONFIG" train.distributed.launcher=ray train.distributed.workers="$WORKERS" "$@"
