#!/usr/bin/env bash
# Make a trained huabi-mini the built-in model and regenerate everything the repository derives from it.
#
#   bash scripts/ship_mini.sh MODEL.safetensors CLIP.safetensors [STEP ...]
#
# MODEL / CLIP: an export of `python -m huabi.train mini-v2` (STATE/huabi-mini-RECIPE.safetensors and
# its -clip pair). STEPs (default: all, in this order):
#   assets     copy both files into src/huabi/assets/models/ (atomically) and print their hashes
#   previews   check huabi-mini's "Approx cheap" preview factors against the new VAE (tests/test_previews.py);
#              if they no longer fit (a new VAE), print refitted ones to paste into src/huabi/core/previews.py and stop
#   grid       the README's prompts x seeds grid (docs/images/huabi-mini-grid.png)
#   faith      python -m huabi.eval.faithfulness on the full set (README table, composed grid)
#   faith-emoji  the same on v4's world, the emoji without skin-tone variants
#   edit       scripts/docs_edit_images.py (the README's editing figure)
#   webui      scripts/webui_screenshot.py (headless chromium)
#   lora       scripts/make_demo_lora.py (the shipped demo LoRA, trained on the new model's pictures)
#   demo       scripts/demo_user_training.py (LoRA / TI / DreamBooth demonstration)
#   compare    the README's `huabi eval compare` example on 320 emoji (docs/eval/, report screenshot)
#   golden     re-record tests/golden (hashes and pictures; after `lora`: some cases use the demo LoRA)
#   bench      bench/bench_mini.py (speed target, ratio against diffusers)
# Steps are independent otherwise, so two lanes can run at once on two cores, e.g.
#   bash scripts/ship_mini.sh M C assets previews && { bash scripts/ship_mini.sh M C faith grid edit webui compare &
#   bash scripts/ship_mini.sh M C lora golden faith-emoji demo; wait; } && bash scripts/ship_mini.sh M C bench
# Pictures are drawn in fp32 with one thread, so they do not depend on the CPU's bf16 support.
# What stays by hand: the README's prose and numbers (faithfulness table, hashes in infotexts, the
# grid's prompt-by-prompt reading), docs/training.md, and the commit.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ $# -lt 2 ]; then
    echo "usage: bash scripts/ship_mini.sh MODEL.safetensors CLIP.safetensors [STEP ...]" >&2
    exit 2
fi
MODEL="$1"; CLIP="$2"; shift 2
for f in "$MODEL" "$CLIP"; do
    [ -f "$f" ] || { echo "ship_mini: $f does not exist" >&2; exit 2; }
done
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(assets previews grid faith faith-emoji edit webui lora demo compare golden bench)
PY="${HUABI_PYTHON:-$REPO/.venv/bin/python}"
HUABI="$(dirname "$PY")/huabi"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
FULL_DATA="$HOME/.cache/huabi/data/huabi-mini-128"
EMOJI_DATA="$HOME/.cache/huabi/data/huabi-mini-emoji-base-128"  # v4's world: emoji without skin-tone variants
WORK="$(mktemp -d /tmp/ship-mini.XXXXXX)"
ASSETS=src/huabi/assets/models
GRID_PROMPTS="a red apple, a cat, a dog, a pizza, a rocket, a blue car, a green heart, a house, a smiling face, a tree"

say() { echo "$(date '+%T') [ship] $*"; }
need_data() {  # FOLDER BUILD-OPTIONS...
    local folder="$1"; shift
    [ -f "$folder/metadata.jsonl" ] || "$PY" -m huabi.data.build --out "$folder" --size 128 "$@" --quiet
}

for step in "${STEPS[@]}"; do
    say "$step"
    case "$step" in
    assets)
        cp "$MODEL" "$ASSETS/.huabi-mini.safetensors.tmp" && mv "$ASSETS/.huabi-mini.safetensors.tmp" "$ASSETS/huabi-mini.safetensors"
        cp "$CLIP" "$ASSETS/.huabi-mini-clip.safetensors.tmp" && mv "$ASSETS/.huabi-mini-clip.safetensors.tmp" "$ASSETS/huabi-mini-clip.safetensors"
        sha256sum "$ASSETS"/huabi-mini*.safetensors
        du -sb src/huabi/assets  # the shipped files: at most 80 MB
        ;;
    previews)
        if ! "$PY" -m pytest -q -p no:cacheprovider tests/test_previews.py -k huabi_mini_factors > "$WORK/previews.txt" 2>&1; then
            tail -n 3 "$WORK/previews.txt"
            need_data "$EMOJI_DATA" --sources emoji --no-skin-tones
            "$PY" scripts/fit_preview_factors.py --images "$EMOJI_DATA"
            echo "ship_mini: the preview factors do not fit the new VAE: paste the factors above into HUABI_MINI_LATENT_RGB (src/huabi/core/previews.py), then re-run from 'grid'" >&2
            exit 1
        fi
        ;;
    grid)
        out="$("$HUABI" xyz "a red apple" --x "Prompt S/R: $GRID_PROMPTS" --y "Seed: 1-4" --dtype fp32 --quiet --out "$WORK/grid" | grep '\.png$' | tail -1)"
        cp "$out" docs/images/huabi-mini-grid.png
        ;;
    faith)
        need_data "$FULL_DATA" --sources emoji,openclipart
        "$PY" -m huabi.eval.faithfulness --threads 1 --json docs/eval/huabi-mini-faithfulness.json --grid docs/images/huabi-mini-composed.png
        ;;
    faith-emoji)
        need_data "$EMOJI_DATA" --sources emoji --no-skin-tones
        "$PY" -m huabi.eval.faithfulness --threads 1 --data "$EMOJI_DATA" --json docs/eval/huabi-mini-faithfulness-emoji-base.json --grid "$WORK/composed-emoji.png"
        ;;
    edit) "$PY" scripts/docs_edit_images.py ;;
    webui) "$PY" scripts/webui_screenshot.py ;;
    lora) "$PY" scripts/make_demo_lora.py ;;
    demo) "$PY" scripts/demo_user_training.py --work "$WORK/demo" ;;
    compare)
        need_data "$EMOJI_DATA" --sources emoji --no-skin-tones
        mkdir -p "$WORK/compare/emoji-real"
        # the reference set: the first 320 emoji of the dataset, by file name
        find "$EMOJI_DATA" -name '*.png' | sort | awk 'NR <= 320' | xargs -I{} cp {} "$WORK/compare/emoji-real/"
        printf '%s\n' "red apple" "rocket" "cat face" "star" "house" "deciduous tree" "automobile" "sun with face" > "$WORK/compare/emoji-prompts.txt"
        (cd "$WORK/compare" && "$HUABI" eval compare --vary "Steps: 2, 20" --prompts emoji-prompts.txt --seeds 1-4 \
            --real emoji-real --out report --json "$REPO/docs/eval/compare-huabi-mini-steps-2-vs-20.json")
        chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,900 \
            --screenshot="$REPO/docs/images/eval-compare-report.png" "file://$WORK/compare/report/report.html" 2>/dev/null
        ;;
    golden) HUABI_RECORD_GOLDEN=1 "$PY" -m pytest -q tests/test_golden_outputs.py ;;
    bench) OMP_NUM_THREADS=2 "$PY" bench/bench_mini.py ;;
    *) echo "ship_mini: unknown step $step" >&2; exit 2 ;;
    esac
done
say "done; work files in $WORK"
