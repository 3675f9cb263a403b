#!/usr/bin/env python3
"""Peer baseline for `genius-engine bench train --device cuda`: the same training step in
PyTorch on the same GPU, right after the engine's run.

The model is random-init with the shape of a preset (Qwen2.5-0.5B by default) from HF
transformers, f32 parameters with bf16 autocast and sdpa attention, torch's fused AdamW. One
step: PAIRS preference pairs (2 x PAIRS sequences of TOKENS random tokens, the first quarter a
prompt), the forward of all of them in one batch, per-token log-probs of the response tokens
gathered with cross-entropy, summed per sequence, a DPO-style pair loss
`-logsigmoid(beta * (chosen - rejected))` (the engine's ACO step has the same cost shape),
backward, global-norm clipping at 1 and the AdamW update. Tokens/s = 2 x PAIRS x TOKENS / the
median step time after WARMUP steps; the peak allocated memory is reported too.

  python3 tools/peer_torch_train.py [--preset qwen2.5-0.5b] [--pairs 4] [--tokens 1024]
                                    [--steps 6] [--warmup 2] [--json FILE]

Needs torch with CUDA and transformers (both are on the lent GPU machines); no network.
"""

import argparse
import json
import statistics
import sys
import time

from peer_hf_generate import PRESETS


def build_model(torch, transformers, preset):
    p = dict(PRESETS[preset])
    arch = p.pop("arch")
    if arch == "qwen2":
        config = transformers.Qwen2Config(**p)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**p)
        cls = transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config)
    model.train()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers

    if not torch.cuda.is_available():
        print("peer-train: no CUDA device visible to torch", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    print(f"peer-train: {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    model = build_model(torch, transformers, args.preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    vocab = model.config.vocab_size
    seqs = 2 * args.pairs
    prompt = args.tokens // 4
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (seqs, args.tokens), device="cuda", generator=g)
    beta = 0.1

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        # Token t is predicted from row t - 1; only response tokens are scored.
        lp = -F.cross_entropy(
            logits[:, prompt - 1 : -1].float().reshape(-1, vocab),
            ids[:, prompt:].reshape(-1),
            reduction="none",
        ).view(seqs, -1).sum(-1)
        chosen, rejected = lp[0::2], lp[1::2]
        loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    tokens = seqs * args.tokens
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "peer": "torch-train",
        "device": name,
        "preset": args.preset,
        "pairs": args.pairs,
        "tokens_per_sequence": args.tokens,
        "median_step_s": med,
        "tokens_per_s": tokens / med,
        "peak_gib": peak,
    }
    print(
        f"peer-train: {seqs} x {args.tokens} tokens per step, median {med * 1e3:.1f} ms, "
        f"{tokens / med:,.0f} tokens/s, peak {peak:.1f} GiB"
    )
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
