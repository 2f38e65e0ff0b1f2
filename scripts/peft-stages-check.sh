#!/usr/bin/env bash
# Trains an SFT adapter, a reward model and a full fine-tune of the bundled tiny Llama with dpo,
# then loads each in Python (peft's PeftModel onto AutoModelForCausalLM /
# AutoModelForSequenceClassification; transformers for the full folder) and checks it computes
# what dpo computed. Usage: PYTHON=/path/to/python-with-torch-transformers-peft scripts/peft-stages-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cargo build --release --quiet
out=$(mktemp -d)
model=tests/fixtures/models/tiny-llama
pairs=tests/fixtures/data/orca_dpo_pairs/train.jsonl
head -n 8 "$pairs" > "$out/pairs.jsonl"
./target/release/dpo sft --model "$model" --dataset tests/fixtures/data/sft/orca_prompt_completion.jsonl \
  --output-dir "$out/sft" --max-steps 3 --lr 0.01 2>/dev/null >/dev/null
./target/release/dpo eval --sft --model "$model" --dataset tests/fixtures/data/sft/orca_prompt_completion.jsonl \
  --adapter "$out/sft" --output "$out/sft_eval.jsonl" 2>/dev/null >/dev/null
./target/release/dpo reward train --model "$model" --dataset "$pairs" --template orca --output-dir "$out/rm" \
  --max-steps 3 --lr 0.01 2>/dev/null >/dev/null
./target/release/dpo reward score --model "$model" --dataset "$out/pairs.jsonl" --template orca --adapter "$out/rm" \
  --output "$out/rm_scores.jsonl" 2>/dev/null >/dev/null
./target/release/dpo train --full --model "$model" --dataset "$pairs" --template orca --output-dir "$out/full" \
  --max-steps 2 --lr 1e-3 2>/dev/null >/dev/null
"$PYTHON" - "$out" <<'PY'
import json, sys
from tokenizers import Tokenizer
out = sys.argv[1]
tok = Tokenizer.from_file("tests/fixtures/models/tiny-llama/tokenizer.json")
def fmt(system, q):
    return (f"### System:\n{system}\n\n" if system else "") + f"### User:\n{q}\n\n### Assistant:\n"
with open(f"{out}/ids.jsonl", "w") as f:
    for line in open(f"{out}/pairs.jsonl"):
        r = json.loads(line)
        prompt = tok.encode(fmt(r["system"], r["question"])).ids
        resp = lambda s: tok.encode(s, add_special_tokens=False).ids + [2]
        f.write(json.dumps({"prompt": prompt, "chosen": resp(r["chosen"]), "rejected": resp(r["rejected"])}) + "\n")
PY
"$PYTHON" scripts/peft_stages_check.py --model "$model" --out "$out" --pairs "$out/ids.jsonl"
