#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize()
# auto-detects the pod, and each host reads its own shard of the data.
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/m2det512_vgg.py gs://bucket/runs/m512
# The repo must be present (same path) on every worker, and the TFDS data in a bucket
# (--config.data.data_dir=gs://...). Not yet: the workdir and data paths do not go through
# etils.epath, so gs:// paths are not supported today; use a shared filesystem path
# (e.g. a Filestore/NFS mount) for WORKDIR and data_dir until they do.
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/m2det-jax && pip install -q -e . 'jax[tpu]' && \
   m2det train --config $CONFIG --workdir $WORKDIR $*"
