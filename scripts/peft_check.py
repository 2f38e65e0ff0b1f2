"""Loads an adapter dpo trained with Python's peft and checks it scores like `dpo eval`.

    python scripts/peft_check.py --model M --adapter A --data pairs.jsonl --dpo-eval eval.jsonl [--n 8]

Needs torch, transformers and peft (not part of the test suite: run by scripts/peft-check.sh).
Prompts use the orca template dpo's --template orca renders, tokenized by the model's
tokenizer.json as dpo tokenizes them (special tokens for the prompt, none for the response, then
EOS); AutoTokenizer may pick a class that skips the BOS post-processor. Exits 1
when a policy log-prob differs from dpo's by more than 1e-4.
"""
import argparse
import json
import math
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def orca_prompt(row):
    user = "### User:\n" + row["question"] + "\n\n### Assistant:\n"
    return ("### System:\n" + row["system"] + "\n\n" + user) if row["system"] else user


def main():
    ap = argparse.ArgumentParser()
    for flag in ["--model", "--adapter", "--data", "--dpo-eval"]:
        ap.add_argument(flag, required=True)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    eos = json.load(open(f"{args.model}/config.json"))["eos_token_id"]
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    rows = [json.loads(l) for l in open(args.data)][: args.n]
    dpo = [json.loads(l) for l in open(args.dpo_eval)][: args.n]
    assert len(rows) == len(dpo), f"{len(rows)} rows but {len(dpo)} dpo eval lines"
    worst = 0.0
    for row, theirs in zip(rows, dpo):
        prompt = tok.encode(orca_prompt(row), add_special_tokens=True).ids
        for key in ["chosen", "rejected"]:
            resp = tok.encode(row[key], add_special_tokens=False).ids + [eos]
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                logits = model(ids).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            ours = logp[len(prompt) - 1 :].sum().item()
            diff = abs(ours - theirs[f"policy_{key}_logp"])
            # max() would skip a NaN (every comparison with it is false): fail on it instead.
            assert math.isfinite(diff), f"non-finite log-prob: peft {ours}, dpo {theirs[f'policy_{key}_logp']}"
            worst = max(worst, diff)
    print(f"{args.adapter}: peft vs dpo policy log-probs, max |diff| {worst:.2e} over {len(rows)} pairs")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
