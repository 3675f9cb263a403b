#!/usr/bin/env python3
"""Peer baseline for `genius-engine bench rollout --device cuda`: the same rollout workload
through Hugging Face transformers' `generate`, on the same GPU, right after the engine's run.

The model is random-init with the shape of a preset (Qwen2.5-0.5B by default: 24 layers, hidden
896, 14 heads / 2 KV heads, vocab 151936, tied embeddings), in bf16 with sdpa attention. Each
batch size runs one warm-up `generate` of 8 new tokens, then a timed `generate` of the prompt
(random token ids) plus exactly NEW_TOKENS sampled tokens per sequence (T = 1, no top-k/top-p,
EOS ignored). Decode tokens/s = batch * new tokens / the timed call's wall time (prefill
included, as the engine's decode figure excludes it: the engine's number is the harder one).

Also measures the device copy ceiling (bytes read + written per second of a 2 GiB
device-to-device copy, median of 20), which the engine's achieved-bandwidth figure is set
against.

  python3 tools/peer_hf_generate.py [--batches 64,256] [--prompt 128] [--new-tokens 256]
                                    [--preset qwen2.5-0.5b] [--json FILE]

Needs torch with CUDA and transformers (both are on the lent GPU machines); no network.
"""

import argparse
import json
import statistics
import sys
import time

PRESETS = {
    "qwen2.5-0.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
}


def copy_ceiling_gbs(torch):
    n = 1 << 30  # 2 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(times) / 1e9


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
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config).to(torch.bfloat16)
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]

    import torch
    import transformers

    if not torch.cuda.is_available():
        print("peer: no CUDA device visible to torch", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    print(f"peer: {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    ceiling = copy_ceiling_gbs(torch)
    print(f"peer: device copy ceiling {ceiling:.0f} GB/s (read + write)")
    model = build_model(torch, transformers, args.preset)
    vocab = model.config.vocab_size
    rows = []
    for batch in batches:
        g = torch.Generator(device="cuda").manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, args.prompt), device="cuda", generator=g)
        mask = torch.ones_like(ids)
        common = dict(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
            eos_token_id=None,
        )
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **common
            )
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                **common,
            )
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
        new = (out.shape[1] - args.prompt) * batch
        tok_s = new / secs
        print(f"peer: batch {batch:4d}: {new} new tokens in {secs:.2f} s = {tok_s:,.0f} tokens/s")
        rows.append({"sequences": batch, "seconds": secs, "new_tokens": new, "tokens_per_s": tok_s})
        del out
        torch.cuda.empty_cache()
    result = {
        "peer": "hf-transformers-generate",
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "preset": args.preset,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "copy_ceiling_gb_s": ceiling,
        "batches": rows,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
