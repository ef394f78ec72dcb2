#!/usr/bin/env bash
# Train (or resume) huabi-mini v2, v3 or v4, warm-started from huabi-mini v1's files; niced, detached-safe,
# appending to the state dir's log. Safe to re-run at any time: finished stages are skipped, the
# running one resumes from its last save (every 5 minutes). Usage (one command, also to resume):
#   setsid nohup bash scripts/train_mini_v2.sh > ~/.cache/huabi/train/launcher-v2.out 2>&1 < /dev/null &
#   HUABI_TRAIN_RECIPE=v3 setsid nohup bash scripts/train_mini_v2.sh > ~/.cache/huabi/train/launcher-v3.out 2>&1 < /dev/null &
# v3 continues v2's finished UNet on the emoji world: it needs v2's state dir
# (--init-unet defaults to its unet/final.pt) and builds its own emoji-only dataset.
# v4 trains on the latents of a new VAE (--init-vae default: the repository's training/huabi-mini-v4-vae.pt,
# the 8-group VAE of `scripts/vae_probe.py --norm-groups 8`), on the emoji without their skin-tone
# variants (its own dataset folder, built with --no-skin-tones); its UNet
# warm-starts from v1 (pass --init-unet FILE to continue other weights, e.g. v3's unet/final.pt).
# v4-long continues a trained v4 UNet on v4's world and VAE with a new data order: --init-unet is required
# (a state's unet/final.pt, or a v4 checkpoint such as the shipped huabi-mini.safetensors, copied out of git
# first since shipping replaces it), e.g.
#   HUABI_TRAIN_RECIPE=v4-long setsid nohup bash scripts/train_mini_v2.sh --base-model ~/huabi-mini-v1.safetensors \
#       --init-unet ~/huabi-mini-v4.safetensors > ~/.cache/huabi/train/launcher-v4-long.out 2>&1 < /dev/null &
# Extra arguments go to `python -m huabi.train mini-v2` (e.g. --steps unet=12000 to train further,
# --base-model FILE with v1's file once the repository ships a later model). The export goes to the state dir
# (STATE/huabi-mini-RECIPE.safetensors), never over the repository's shipped model.
# Environment overrides: HUABI_TRAIN_RECIPE (v2 | v3 | v4 | v4-long), HUABI_TRAIN_STATE, HUABI_TRAIN_DATA,
# HUABI_TRAIN_THREADS, HUABI_TRAIN_DEVICE, HUABI_PYTHON.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECIPE="${HUABI_TRAIN_RECIPE:-v2}"
STATE="${HUABI_TRAIN_STATE:-$HOME/.cache/huabi/train/huabi-mini-$RECIPE}"
SOURCES="emoji,openclipart"
DEFAULT_DATA="$HOME/.cache/huabi/data/huabi-mini-128"
EXTRA=()
TRAIN="$HOME/.cache/huabi/train"
BUILD_EXTRA=()
case "$RECIPE" in
v3)  # v2's UNet on all the emoji
    SOURCES="emoji"
    DEFAULT_DATA="$HOME/.cache/huabi/data/huabi-mini-emoji-128"
    case " $* " in *" --init-unet "*) ;; *) EXTRA+=(--init-unet "$TRAIN/huabi-mini-v2/unet/final.pt") ;; esac
    ;;
v4 | v4-long)  # the emoji without their skin-tone variants, on the repository's 8-group VAE
    SOURCES="emoji"
    DEFAULT_DATA="$HOME/.cache/huabi/data/huabi-mini-emoji-base-128"
    BUILD_EXTRA=(--no-skin-tones)
    case " $* " in *" --init-vae "*) ;; *) EXTRA+=(--init-vae "$REPO/training/huabi-mini-v4-vae.pt") ;; esac
    ;;
esac
DATA="${HUABI_TRAIN_DATA:-$DEFAULT_DATA}"
THREADS="${HUABI_TRAIN_THREADS:-2}"
DEVICE="${HUABI_TRAIN_DEVICE:-cpu}"
PYTHON="${HUABI_PYTHON:-$REPO/.venv/bin/python}"
mkdir -p "$STATE"
exec 9>"$STATE/.launcher.lock"
if ! flock -n 9; then
    echo "another train_mini_v2.sh is already running on $STATE" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
# run the repository's code even when another huabi is installed in the venv
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
echo "$(date '+%F %T') [launcher] pid $$ start ($RECIPE): data $DATA state $STATE threads $THREADS device $DEVICE" >> "$STATE/train.log"
cd "$REPO"
if [ ! -f "$DATA/metadata.jsonl" ] && [ ! -d "$STATE/data" ]; then
    echo "$(date '+%F %T') [launcher] building the dataset in $DATA" >> "$STATE/train.log"
    "$PYTHON" -m huabi.data.build --out "$DATA" --size 128 --sources "$SOURCES" ${BUILD_EXTRA[@]+"${BUILD_EXTRA[@]}"} --quiet >> "$STATE/train.log" 2>&1
fi
set +e
nice -n 19 "$PYTHON" -m huabi.train mini-v2 --recipe "$RECIPE" \
    --data "$DATA" --state "$STATE" --device "$DEVICE" --threads "$THREADS" \
    --out "$STATE/huabi-mini-$RECIPE.safetensors" \
    --repo-log "$REPO/docs/huabi-mini-$RECIPE-training-log.txt" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
status=$?
echo "$(date '+%F %T') [launcher] exit status $status" >> "$STATE/train.log"
exit $status
