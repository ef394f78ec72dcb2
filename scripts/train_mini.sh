#!/usr/bin/env bash
# Train (or resume) huabi-mini: the whole recipe, niced, appending to the state dir's log.
# Safe to re-run at any time: finished stages are skipped, a running stage resumes from
# its last save (saved every 5 minutes). Usage:
#   setsid nohup bash scripts/train_mini.sh > ~/.cache/huabi/train/launcher.out 2>&1 < /dev/null &
# Environment overrides: HUABI_TRAIN_STATE, HUABI_TRAIN_DATA, HUABI_TRAIN_THREADS, HUABI_TRAIN_DEVICE.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HUABI_TRAIN_STATE:-$HOME/.cache/huabi/train/huabi-mini}"
DATA="${HUABI_TRAIN_DATA:-$HOME/.cache/huabi/data/huabi-mini-128}"
THREADS="${HUABI_TRAIN_THREADS:-2}"
DEVICE="${HUABI_TRAIN_DEVICE:-cpu}"
PYTHON="${HUABI_PYTHON:-$REPO/.venv/bin/python}"
mkdir -p "$STATE"
LOCK="$STATE/.launcher.lock"
exec 9>"$LOCK"
if ! flock -n 9; then
    echo "another train_mini.sh is already running on $STATE" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
echo "$(date '+%F %T') [launcher] pid $$ start: data $DATA state $STATE threads $THREADS device $DEVICE" >> "$STATE/train.log"
cd "$REPO"
if [ ! -f "$DATA/metadata.jsonl" ] && [ ! -d "$STATE/data" ]; then
    # A new machine: build the offline dataset first (about 2.5 minutes; needs `bash setup.sh --train`).
    echo "$(date '+%F %T') [launcher] building the dataset in $DATA" >> "$STATE/train.log"
    "$PYTHON" -m huabi.data.build --out "$DATA" --size 128 --quiet >> "$STATE/train.log" 2>&1
fi
train() {
    nice -n 10 "$PYTHON" -m huabi.train mini \
        --data "$DATA" --state "$STATE" --device "$DEVICE" \
        --repo-log "$REPO/docs/huabi-mini-training-log.txt" "$@"
}
set +e
status=0
if [ "$DEVICE" = cpu ] && [ "$THREADS" -ge 2 ] && { [ ! -f "$STATE/vae/done.json" ] || [ ! -f "$STATE/clip/done.json" ]; }; then
    # The VAE and CLIP stages are independent and small: side by side with half the threads
    # each they finish sooner than one after the other with all of them.
    half=$((THREADS / 2))
    trap 'kill -TERM $(jobs -p) 2>/dev/null' TERM INT  # each stage saves and stops
    train --stage vae --threads "$half" "$@" & vae_pid=$!
    train --stage clip --threads "$((THREADS - half))" "$@" & clip_pid=$!
    wait "$vae_pid" || status=$?
    wait "$clip_pid" || status=$?
fi
if [ "$status" = 0 ]; then
    train --stage all --threads "$THREADS" "$@"
    status=$?
fi
echo "$(date '+%F %T') [launcher] exit status $status" >> "$STATE/train.log"
exit $status
