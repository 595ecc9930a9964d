#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize()
# auto-detects the pod, and each host reads its own shard of the data.
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/m2det512_vgg.py gs://bucket/runs/m512
# The repo must be present (same path) on every worker. WORKDIR and the TFDS data may be
# buckets (gs://..., --config.data.data_dir=gs://...): every user path goes through
# etils.epath (gcsfs, or TensorFlow's gfile where installed: the '.[gcs]' extra), and
# orbax writes checkpoint arrays through tensorstore's GCS driver. jax.distributed
# .initialize() with no arguments finds the coordinator, process count and id from the
# TPU VM metadata (jax 0.10: cluster auto-detection for Cloud TPU, SLURM, ...).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/m2det-jax && pip install -q -e '.[gcs]' 'jax[tpu]' && \
   m2det train --config $CONFIG --workdir $WORKDIR $*"
