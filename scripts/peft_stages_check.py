"""Loads what `dpo sft`, `dpo reward train` and `dpo train --full` wrote into transformers/peft
and checks they compute what dpo computed (see scripts/peft-stages-check.sh)."""
import argparse, json, math
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import PeftModel

p = argparse.ArgumentParser()
p.add_argument("--model"); p.add_argument("--out"); p.add_argument("--pairs")
a = p.parse_args()
torch.manual_seed(0)

def ids(line, key):
    return torch.tensor([line[key]])

def gap(a, b):
    """|a - b|, failing on NaN or inf (max() would silently skip a NaN)."""
    d = abs(a - b)
    assert math.isfinite(d), f"non-finite value: {a} vs {b}"
    return d

pairs = [json.loads(l) for l in open(a.pairs)]

# 1. The SFT adapter on a causal LM: the completion log-probs dpo reported.
base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
sft = PeftModel.from_pretrained(base, f"{a.out}/sft").eval()
want = [json.loads(l) for l in open(f"{a.out}/sft_eval.jsonl")]
assert len(want) >= len(pairs), f"{len(want)} sft eval lines for {len(pairs)} pairs"
worst = 0.0
for pair, w in zip(pairs, want):
    seq = torch.tensor([pair["prompt"] + pair["chosen"]])
    with torch.no_grad():
        logits = sft(seq).logits[0, :-1].log_softmax(-1)
    lp = logits.gather(1, seq[0, 1:, None])[:, 0][len(pair["prompt"]) - 1:].sum().item()
    worst = max(worst, gap(lp, w["policy_chosen_logp"]))
print(f"sft adapter in peft: max |logp - dpo| = {worst:.2e}")
assert worst < 1e-3

# 2. The reward adapter on a sequence classifier: dpo reward score's rewards.
base = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, torch_dtype=torch.float32)
base.config.pad_token_id = 3
rm = PeftModel.from_pretrained(base, f"{a.out}/rm").eval()
want = [json.loads(l) for l in open(f"{a.out}/rm_scores.jsonl")]
assert len(want) == len(pairs), f"{len(want)} reward lines for {len(pairs)} pairs"
worst = 0.0
for pair, w in zip(pairs, want):
    for side in ["chosen", "rejected"]:
        with torch.no_grad():
            r = rm(torch.tensor([pair["prompt"] + pair[side]])).logits[0, 0].item()
        worst = max(worst, gap(r, w[f"reward_{side}"]))
print(f"reward adapter in peft: max |reward - dpo| = {worst:.2e}")
assert worst < 1e-4

# 3. The full fine-tuning output folder loads as a model and differs from the base.
full = AutoModelForCausalLM.from_pretrained(f"{a.out}/full", torch_dtype=torch.float32)
trained, base = list(full.parameters()), list(AutoModelForCausalLM.from_pretrained(a.model).parameters())
assert len(trained) == len(base) and all(torch.isfinite(t).all() for t in trained), "missing or non-finite weights"
moved = max((p1 - p0).abs().max().item() for p1, p0 in zip(trained, base))
print(f"full model folder loads in transformers; largest weight change {moved:.2e}")
assert moved > 0
print("OK")
