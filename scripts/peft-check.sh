#!/usr/bin/env bash
# For each zoo family: train an all-linear LoRA with dpo for 3 steps, score the first 8 pairs
# with `dpo eval`, then load the adapter in Python's peft and check it scores the same.
# Usage: PYTHON=/path/to/python-with-torch-transformers-peft scripts/peft-check.sh [families...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
families=${*:-llama3 mistral-hd qwen3 qwen2-yarn gemma gemma2 gemma3 phi3 smollm3 olmo2}
cargo build --release --quiet
out=$(mktemp -d)
data=tests/fixtures/data/orca_dpo_pairs/train.jsonl
for f in $families; do
  model=tests/fixtures/zoo/$f/model
  ./target/release/dpo train --model "$model" --dataset "$data" --output-dir "$out/$f" --template orca \
    --lora-targets all --lora-r 4 --lr 0.02 --max-steps 3 --seed 5 2>/dev/null
  ./target/release/dpo eval --model "$model" --dataset "$data" --adapter "$out/$f" --template orca \
    --output "$out/$f/eval.jsonl" 2>/dev/null >/dev/null
  "$PYTHON" scripts/peft_check.py --model "$model" --adapter "$out/$f" --data "$data" --dpo-eval "$out/$f/eval.jsonl"
done
