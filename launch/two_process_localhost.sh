#!/usr/bin/env bash
# Two JAX processes on one machine (what the tests do): explicit coordinator flags.
#   bash launch/two_process_localhost.sh configs/tiny.py /tmp/two
set -euo pipefail
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
PORT=${PORT:-12355}
for i in 0 1; do
  m2det train --config "$CONFIG" --workdir "$WORKDIR" --coordinator_address "127.0.0.1:$PORT" \
    --num_processes 2 --process_id "$i" "$@" &
done
wait
