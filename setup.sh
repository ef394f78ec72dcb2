#!/usr/bin/env bash
# Sets huabi up on a fresh machine (Python 3.11 with pip; apt when run as root):
#   bash setup.sh          runtime: a venv in .venv with huabi and its pinned dependencies
#   bash setup.sh --dev    also the test tools and the Debian data packages the tests and training read
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

MODE="run"
case "${1:-}" in
  "") ;;
  --dev) MODE="dev" ;;
  --train) MODE="train" ;;
  *) echo "usage: bash setup.sh [--dev|--train]" >&2; exit 2 ;;
esac

# Data for the built-in model's dataset (issue 3) and the tests that build a slice of it.
APT_PACKAGES="fonts-noto-color-emoji unicode-data unicode-cldr-core openclipart-png openclipart-svg libcairo2"
# The web UI's browser test (issue 15) drives Debian's chromium through its chromedriver.
if [ "$MODE" = "dev" ]; then APT_PACKAGES="$APT_PACKAGES chromium chromium-driver"; fi
PYTHON="${PYTHON:-python3}"

if [ "$MODE" != "run" ]; then
  missing=""
  for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing Debian packages:$missing" >&2
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      echo "setup: please install these Debian packages (as root): apt-get install$missing" >&2
      exit 1
    fi
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/pip"
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch 2.13.0" >&2
  "$PIP" install -q --disable-pip-version-check "torch==2.13.0"
fi
EXTRAS=""
[ "$MODE" = "dev" ] && EXTRAS="[dev]"
[ "$MODE" = "train" ] && EXTRAS="[train]"
STAMP=".venv/.huabi-installed$EXTRAS"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing huabi$EXTRAS and its dependencies" >&2
  "$PIP" install -q --disable-pip-version-check -e ".$EXTRAS"
  touch "$STAMP"
fi

# Reference implementations for huabi.eval's equivalence tests (issue 18). They declare torchvision, which
# would replace the pinned torch with a CUDA build: install them without dependencies (the tests load only
# their modules that need no torchvision).
# spandrel (upscaler reference, issue 22) likewise: its tests import only its ESRGAN/Compact modules.
if [ "$MODE" = "dev" ] && ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch_fidelity', 'pytorch_fid', 'cleanfid', 'spandrel')))" 2>/dev/null; then
  echo "setup: installing the FID and upscaler reference packages (--no-deps)" >&2
  "$PIP" install -q --disable-pip-version-check --no-deps "torch-fidelity==0.4.0" "pytorch-fid==0.3.0" "clean-fid==0.1.35" "spandrel==0.4.2"
fi
# The original CLIP tokenizer for the tokenizer tests: open_clip's wheel, downloaded, never installed
# (it pulls torchvision); the tests read its tokenizer module and vocabulary out of the archive.
if [ "$MODE" = "dev" ] && ! ls .venv/huabi-reference/open_clip_torch-3.3.0-*.whl >/dev/null 2>&1; then
  echo "setup: downloading the open_clip wheel (tokenizer reference, not installed)" >&2
  "$PIP" download -q --disable-pip-version-check --no-deps "open_clip_torch==3.3.0" -d .venv/huabi-reference
fi
# controlnet_aux's annotator code (ControlNet preprocessor reference): downloaded, never installed (it pulls
# torchvision/timm); the annotator tests load single module files out of the archive.
if [ "$MODE" = "dev" ] && ! ls .venv/huabi-reference/controlnet_aux-0.0.10-*.whl >/dev/null 2>&1; then
  echo "setup: downloading the controlnet_aux wheel (annotator reference, not installed)" >&2
  "$PIP" download -q --disable-pip-version-check --no-deps "controlnet_aux==0.0.10" -d .venv/huabi-reference
fi

echo "setup: ready ($MODE)" >&2
