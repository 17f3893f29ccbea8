#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (a TPU pod): create it or reuse it, copy this checkout to every
# worker, set up a virtualenv once per worker, and run the same trainer command on all workers
# (jax.distributed.initialize() detects the slice). Arguments go to the trainer:
#
#   TPU_NAME=p2p-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/p2p/cityscapes DATA_DIR=gs://my-bucket/tfds \
#   launch/tpu_pod.sh --config=configs/cityscapes.py --config.data.batch_size=64
#
# The workdir and TFDS data live on a bucket, which orbax and tfds read and write directly, so
# every worker sees the same checkpoints. Aligned A|B folders are read from a gs:// DATA_DIR
# directly, or, with SYNC_DATA=1, from a copy on every worker's disk.
#
# Environment:
#   TPU_NAME, ZONE     the TPU VM (required)
#   WORKDIR            checkpoints, TensorBoard events, eval results (required; gs://...)
#   DATA_DIR           --config.data.data_dir (optional)
#   SYNC_DATA          1: copy a gs:// DATA_DIR to ~/p2p_data on every worker (aligned folders;
#                      without it they are read from the bucket)
#   ACCELERATOR_TYPE   slice to create if TPU_NAME does not exist (default v4-32)
#   RUNTIME_VERSION    TPU VM image for a new slice (default tpu-ubuntu2204-base)
#   SPOT               1: create a Spot slice (preempted with SIGTERM; rerun this to resume)
#   PROJECT            gcloud project (default: gcloud's configured one)
#   REINSTALL          1: rebuild the workers' virtualenv (after a dependency change)
#   DETACH             1: start training under nohup and return (log: ~/p2p_jax_train.log)
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
cd "$(dirname "$0")/.."

on_all_workers() {  # Runs a shell command on every worker of the slice, in parallel.
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${common[@]}" --worker=all --command "$1"
}

# 1. The slice: reuse it if it exists.
if ! "${gcloud_tpu[@]}" describe "$TPU_NAME" "${common[@]}" > /dev/null 2>&1; then
  echo "Creating $ACCELERATOR_TYPE slice $TPU_NAME in $ZONE" >&2
  spot=()
  if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
  "${gcloud_tpu[@]}" create "$TPU_NAME" "${common[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
fi

# 2. This checkout (without its virtualenv, git history or caches) on every worker.
archive=$(mktemp -t p2p_jax.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
tar czf "$archive" --exclude=.venv --exclude=.git --exclude=__pycache__ .
"${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME":p2p_jax.tar.gz "${common[@]}" --worker=all
on_all_workers 'rm -rf ~/p2p_jax && mkdir -p ~/p2p_jax && tar xzf ~/p2p_jax.tar.gz -C ~/p2p_jax'

# 3. A virtualenv per worker, built once (the package is installed editable, so new code needs
#    no reinstall).
on_all_workers "set -e
  if [[ '${REINSTALL:-0}' == 1 ]]; then rm -rf ~/p2p_jax_venv; fi
  if [[ ! -x ~/p2p_jax_venv/bin/python ]]; then
    python3 -m venv ~/p2p_jax_venv
    ~/p2p_jax_venv/bin/pip install --quiet --upgrade pip
    ~/p2p_jax_venv/bin/pip install --quiet 'jax[tpu]' -e ~/p2p_jax
  fi"

# 4. The data option: a bucket path as it is, or a local copy on every worker, if asked.
args=(--workdir="$WORKDIR" --distributed)
data_arg=
if [[ ${SYNC_DATA:-0} == 1 && ${DATA_DIR:-} == gs://* ]]; then
  on_all_workers "mkdir -p ~/p2p_data && gcloud storage rsync --recursive '$DATA_DIR' ~/p2p_data"
  data_arg='--config.data.data_dir=$HOME/p2p_data'  # Expanded on the worker.
elif [[ -n ${DATA_DIR:-} ]]; then
  args+=(--config.data.data_dir="$DATA_DIR")
fi

# 5. The same command on every worker.
train="cd ~/p2p_jax && ~/p2p_jax_venv/bin/python -m p2p_jax.main $(printf '%q ' "$@" "${args[@]}") $data_arg"
if [[ ${DETACH:-0} == 1 ]]; then
  on_all_workers "nohup bash -c $(printf '%q' "$train") > ~/p2p_jax_train.log 2>&1 < /dev/null &"
  echo "Training in the background; worker logs: ~/p2p_jax_train.log" >&2
else
  on_all_workers "$train"
fi
