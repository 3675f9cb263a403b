#!/usr/bin/env python3
"""Loads a checkpoint written by genius-engine (e.g. runs/<ts>/round-1/checkpoint) with HF
transformers and compares its per-token log-probs with `genius-engine score` on the same
chat-templated prompt. Needs torch and transformers (not part of CI: too large to install
there). Usage: check_hf_checkpoint.py CHECKPOINT [ENGINE_BINARY]"""
import json, subprocess, sys, tempfile, os
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ckpt = sys.argv[1]
engine = sys.argv[2] if len(sys.argv) > 2 else "target/release/genius-engine"
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
prompt = tok.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}],
                                 tokenize=False, add_generation_prompt=True)
completion = "The reasoning steps are:\n\n1. 7 times 8 is 56."
p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
c_ids = tok(completion, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    lp = torch.log_softmax(model(torch.tensor([p_ids + c_ids])).logits[0].float(), -1)
hf = [lp[len(p_ids) + i - 1, t].item() for i, t in enumerate(c_ids)]

with tempfile.TemporaryDirectory() as d:
    inp, out = os.path.join(d, "in.jsonl"), os.path.join(d, "out.jsonl")
    with open(inp, "w") as f:
        f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    subprocess.run([engine, "score", "--device", "cpu", "--model", ckpt, "--input", inp,
                    "--output", out], check=True)
    eng = json.loads(open(out).readline())
assert eng["prompt_ids"] == p_ids and eng["completion_ids"] == c_ids, "tokenizations differ"
diff = max(abs(a - b) for a, b in zip(hf, eng["logprobs"]))
print(f"transformers loads {ckpt}; {len(c_ids)} completion tokens, same ids; "
      f"max |log-prob difference| {diff:.2e} (sum {sum(hf):.6f} vs {eng['sum']:.6f})")
sys.exit(0 if diff < 1e-3 else 1)
