#!/usr/bin/env bash
# Default head sets for SmolLM2-135M-Instruct (or any model folder) in one call: self-distilled data, then
# medusa, hydra and hydra++ trained together on one wall-clock budget, saved in bf16 with model cards.
#
#   scripts/train_default_heads.sh MODEL_DIR OUT_DIR [PROMPTS] [MAX_NEW_TOKENS] [TIME_BUDGET_S] [extra args]
#   e.g. scripts/train_default_heads.sh ~/.cache/hydra_fast/SmolLM2-135M-Instruct out/heads 4000 256 480 \
#            --pack-dir "$OUT" --source builtin:1500 --source stdlib:1500 --source wiki:1500@summaries_en-us.json
#
# Extra args go to `hydra-fast-train default-heads` (see --help): --steps, --batch-size, --lr, --kinds, ...
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR OUT_DIR [PROMPTS] [MAX_NEW_TOKENS] [TIME_BUDGET_S] [extra args]}
OUT=${2:?usage: $0 MODEL_DIR OUT_DIR [PROMPTS] [MAX_NEW_TOKENS] [TIME_BUDGET_S] [extra args]}
PROMPTS=${3:-4000}
NEW=${4:-256}
BUDGET=${5:-480}
shift $(( $# < 5 ? $# : 5 ))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m hydra_fast.train default-heads --model "$MODEL" --out "$OUT" --prompts "$PROMPTS" \
    --max-new-tokens "$NEW" --time-budget "$BUDGET" "$@"
