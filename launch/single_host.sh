#!/usr/bin/env bash
# One machine, all its devices (CPU, one or more GPUs, or a single TPU VM).
#   bash launch/single_host.sh configs/m2det512_vgg.py /data/runs/m512 [--config.a.b=v ...]
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
exec m2det train --config "$CONFIG" --workdir "$WORKDIR" "$@"
