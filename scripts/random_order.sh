#!/usr/bin/env bash
# Run tests in a random order, several times with different seeds, to find tests that depend on
# what another test left behind (pytest-random-order, a [dev] dependency; it is off unless asked).
#
#   bash scripts/random_order.sh                          # the whole suite, 2 runs, modules shuffled
#   RUNS=3 BUCKET=global bash scripts/random_order.sh tests/test_hires.py tests/test_lora_engine.py
#   SEEDS="11 12" bash scripts/random_order.sh            # replay given seeds (each run prints its seed)
#
# BUCKET=module (default) shuffles the modules and the tests inside each module, keeping module-scoped
# fixtures built once; BUCKET=global mixes tests of all modules (module fixtures are rebuilt often: slow).
# Exit status: non-zero if any run failed; the failing seed is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUNS="${RUNS:-2}"
BUCKET="${BUCKET:-module}"
SEEDS="${SEEDS:-}"
if [ -z "$SEEDS" ]; then
  for _ in $(seq "$RUNS"); do SEEDS="$SEEDS $((RANDOM * 32768 + RANDOM))"; done
fi
status=0
for seed in $SEEDS; do
  echo "random order: seed $seed, bucket $BUCKET" >&2
  if ! "$PYTHON" -m pytest -q -p no:cacheprovider --random-order-bucket="$BUCKET" --random-order-seed="$seed" "$@"; then
    echo "random order: FAILED with seed $seed (replay: SEEDS=$seed BUCKET=$BUCKET bash scripts/random_order.sh $*)" >&2
    status=1
  fi
done
exit $status
