#!/usr/bin/env python3
"""Independent float64 reference for `genius-engine score`.

Reads a LLaMA-architecture GGUF file with the `gguf` package (llama.cpp's own Python reader),
runs the transformer in float64 numpy and checks the engine's per-token log-probabilities:

    python3 tools/reference_logprobs.py --gguf MODEL.gguf --scored OUT.jsonl [--max-lines N]

Each line of OUT.jsonl is the engine's score output,
``{"prompt_ids": [...], "completion_ids": [...], "logprobs": [...], "sum": x}``, where
``logprobs[i] = log p(completion_ids[i] | prompt_ids + completion_ids[:i])``. The script prints
the max |difference| per line and the overall max and mean, and exits with status 1 when the max
exceeds ``--tol``.

Other modes (same model loading and forward pass):

    --scored IN.jsonl --emit OUT.jsonl       write the reference's own scores (for fixtures)
    --prompt-text T [--chat] --completion-text C   tokenize and score text, print one JSONL line
    --prompt-text T [--chat] --generate N    greedy continuation (stops at the EOS token)

Independence from the Rust engine is the point of this file, so it shares neither code nor
shortcuts with it. In particular the engine un-permutes llama.cpp's Q/K rows back to Hugging
Face layout and applies rotate-half RoPE; this script keeps the rows exactly as stored and applies
llama.cpp's own RoPE on adjacent pairs instead (see `rope_adjacent_pairs`). Both are correct, so
agreement between them is real evidence.

The text modes need the `tokenizers` package (imported only when used); the tokenizer is rebuilt
from the GGUF vocabulary and merges (GPT-2 byte-level BPE, digits split one by one as in SmolLM2).
Requirements: tools/requirements-reference.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# --------------------------------------------------------------------------------------------
# Model: config and weights from GGUF
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, read from the GGUF `llama.*` metadata keys."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_rot: int  # leading dimensions of each head that RoPE rotates
    rms_eps: float
    rope_base: float
    vocab_size: int


def field_value(reader: GGUFReader, key: str, default=None):
    """A metadata value (scalar, string or array), or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata has no '{key}'")
        return default
    return field.contents()


def read_config(reader: GGUFReader) -> LlamaConfig:
    """Builds the config from metadata; refuses what this reference does not implement."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"only the 'llama' GGUF architecture is implemented, not '{arch}'")
    for unsupported in ("llama.rope.scaling.type", "llama.rope.scaling.factor"):
        if unsupported in reader.fields:
            raise SystemExit(f"RoPE scaling ('{unsupported}') is not implemented here")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise SystemExit("per-frequency RoPE factors (rope_freqs.weight) are not implemented here")

    d_model = int(field_value(reader, "llama.embedding_length"))
    n_heads = int(field_value(reader, "llama.attention.head_count"))
    head_dim = d_model // n_heads
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        n_layers=int(field_value(reader, "llama.block_count")),
        d_model=d_model,
        d_ff=int(field_value(reader, "llama.feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(field_value(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        n_rot=int(field_value(reader, "llama.rope.dimension_count", head_dim)),
        rms_eps=float(field_value(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_base=float(field_value(reader, "llama.rope.freq_base", 10000.0)),
        vocab_size=int(field_value(reader, "llama.vocab_size", n_tokens)),
    )


def load_weights(reader: GGUFReader) -> dict[str, np.ndarray]:
    """All tensors by GGUF name, dequantised and widened to float64.

    `gguf` returns a matrix as [rows, columns] = [out_features, in_features] (GGUF lists the
    dimensions the other way round), so a linear layer is `x @ W.T`.
    """
    weights = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.asarray(values, dtype=np.float64)
    return weights


# --------------------------------------------------------------------------------------------
# The transformer, float64
# --------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_adjacent_pairs(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float):
    """RoPE as llama.cpp applies it to LLaMA models: rotates pairs (x[2i], x[2i+1]).

    x: [tokens, heads, head_dim]. Pair i (i < n_rot/2) turns by angle pos * base^(-2i/n_rot).

    Why adjacent pairs here and not Hugging Face's rotate-half pairs (x[j], x[j + head_dim/2])?
    llama.cpp's converter permutes the rows of attn_q/attn_k within each head so that HF's row
    j and row j + head_dim/2 land next to each other, at 2j and 2j+1 (HF's `rotate_half` pairs
    become adjacent pairs, with the same frequency base^(-2j/head_dim)). So the stored weights
    with adjacent-pair RoPE produce the HF queries and keys up to the same per-head permutation
    of dimensions in both q and k, which leaves every dot product q.k, hence the attention, and
    everything after it unchanged. V and the output projection are not permuted.
    """
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)  # [n_rot/2]
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [tokens, n_rot/2]
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    even = x[..., 0:n_rot:2]
    odd = x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = even * cos - odd * sin
    out[..., 1:n_rot:2] = even * sin + odd * cos
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class ReferenceLlama:
    """A LLaMA decoder in float64 numpy, straight from GGUF tensor names."""

    def __init__(self, gguf_path: Path):
        reader = GGUFReader(str(gguf_path))
        self.reader = reader
        self.config = read_config(reader)
        self.w = load_weights(reader)
        # Tied embeddings: without output.weight the LM head is the token embedding matrix.
        self.lm_head = self.w.get("output.weight", self.w["token_embd.weight"])
        self.eos_id = int(field_value(reader, "tokenizer.ggml.eos_token_id", -1))

    def attention(self, layer: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Causal grouped-query self-attention of one layer over the whole sequence."""
        c = self.config
        w = self.w
        t = x.shape[0]
        q = (x @ w[f"blk.{layer}.attn_q.weight"].T).reshape(t, c.n_heads, c.head_dim)
        k = (x @ w[f"blk.{layer}.attn_k.weight"].T).reshape(t, c.n_kv_heads, c.head_dim)
        v = (x @ w[f"blk.{layer}.attn_v.weight"].T).reshape(t, c.n_kv_heads, c.head_dim)
        q = rope_adjacent_pairs(q, positions, c.n_rot, c.rope_base)
        k = rope_adjacent_pairs(k, positions, c.n_rot, c.rope_base)
        # GQA: query head h reads key/value head h // (n_heads / n_kv_heads).
        group = c.n_heads // c.n_kv_heads
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
        future = np.triu(np.ones((t, t), dtype=bool), k=1)
        scores = np.where(future[None, :, :], -np.inf, scores)
        probs = np.exp(log_softmax(scores))
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(t, c.n_heads * c.head_dim)
        return out @ w[f"blk.{layer}.attn_output.weight"].T

    def mlp(self, layer: int, x: np.ndarray) -> np.ndarray:
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        w = self.w
        gate = x @ w[f"blk.{layer}.ffn_gate.weight"].T
        up = x @ w[f"blk.{layer}.ffn_up.weight"].T
        return (silu(gate) * up) @ w[f"blk.{layer}.ffn_down.weight"].T

    def hidden_states(self, token_ids: list[int]) -> np.ndarray:
        """Final-norm hidden states [tokens, d_model] for a sequence starting at position 0."""
        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.lm_head.shape[0]:
            raise ValueError(f"token ids must be non-empty and in [0, {self.lm_head.shape[0]})")
        positions = np.arange(len(ids))
        x = self.w["token_embd.weight"][ids]
        for layer in range(c.n_layers):
            h = rms_norm(x, self.w[f"blk.{layer}.attn_norm.weight"], c.rms_eps)
            x = x + self.attention(layer, h, positions)
            h = rms_norm(x, self.w[f"blk.{layer}.ffn_norm.weight"], c.rms_eps)
            x = x + self.mlp(layer, h)
        return rms_norm(x, self.w["output_norm.weight"], c.rms_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.lm_head.T

    def completion_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
        """log p(completion_ids[i] | prompt_ids + completion_ids[:i]) for every i."""
        if not prompt_ids:
            raise ValueError("prompt_ids must be non-empty: the first token has no context")
        if not completion_ids:
            return np.zeros(0)
        sequence = list(prompt_ids) + list(completion_ids)
        hidden = self.hidden_states(sequence[:-1])
        # Position p predicts token p + 1; the completion starts at len(prompt_ids).
        predicting = hidden[len(prompt_ids) - 1 :]
        logp = log_softmax(self.logits(predicting))
        return logp[np.arange(len(completion_ids)), np.asarray(completion_ids)]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Argmax continuation (recomputes the whole sequence per token: simple, not fast)."""
        ids = list(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            last = self.hidden_states(ids)[-1:]
            token = int(np.argmax(self.logits(last)[0]))
            new.append(token)
            ids.append(token)
            if token == self.eos_id:
                break
        return new


# --------------------------------------------------------------------------------------------
# Tokenizer (text modes only)
# --------------------------------------------------------------------------------------------


def build_tokenizer(reader: GGUFReader):
    """A `tokenizers` byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges.

    Pre-tokenisation follows SmolLM2's tokenizer.json (llama.cpp calls it 'smollm'): every digit
    on its own, then the GPT-2 byte-level split. Control tokens (<|im_start|> ...) are special.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = field_value(reader, "tokenizer.ggml.pre", "")
    if field_value(reader, "tokenizer.ggml.model") != "gpt2" or pre not in ("smollm", ""):
        print(f"warning: tokenizer '{pre}' is approximated by SmolLM2's rules", file=sys.stderr)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    token_types = field_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    tokenizer.add_special_tokens([t for t, ty in zip(tokens, token_types) if ty == control])
    return tokenizer


def chatml_user_turn(text: str) -> str:
    """One ChatML user turn opening the assistant's reply (no system message)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path, max_lines: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if max_lines is not None and len(rows) >= max_lines:
                break
    return rows


def compare(model: ReferenceLlama, rows: list[dict], tol: float) -> bool:
    """Prints per-line and overall differences; True when every line is within `tol`."""
    all_diffs = []
    ok = True
    for n, row in enumerate(rows, 1):
        started = time.perf_counter()
        reference = model.completion_logprobs(row["prompt_ids"], row["completion_ids"])
        engine = np.asarray(row["logprobs"], dtype=np.float64)
        if engine.shape != reference.shape:
            print(f"line {n}: {len(engine)} logprobs for {len(reference)} completion tokens")
            ok = False
            continue
        diff = np.abs(engine - reference)
        all_diffs.append(diff)
        line_max = float(diff.max()) if diff.size else 0.0
        sum_note = ""
        if "sum" in row:
            sum_note = f", sum engine {row['sum']:.6f} reference {reference.sum():.6f}"
        print(
            f"line {n}: {len(row['prompt_ids'])}+{len(reference)} tokens, "
            f"max |diff| {line_max:.3e}{sum_note} ({time.perf_counter() - started:.2f} s)"
        )
    diffs = np.concatenate(all_diffs) if all_diffs else np.zeros(0)
    overall_max = float(diffs.max()) if diffs.size else 0.0
    overall_mean = float(diffs.mean()) if diffs.size else 0.0
    print(
        f"overall: {len(rows)} lines, {diffs.size} tokens, max |diff| {overall_max:.3e}, "
        f"mean |diff| {overall_mean:.3e}, tolerance {tol:g}"
    )
    return ok and overall_max <= tol


def scored_row(prompt_ids: list[int], completion_ids: list[int], logprobs: np.ndarray) -> dict:
    return {
        "prompt_ids": list(prompt_ids),
        "completion_ids": list(completion_ids),
        "logprobs": [float(x) for x in logprobs],
        "sum": float(logprobs.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="LLaMA-architecture GGUF file")
    parser.add_argument("--scored", type=Path, help="engine score output (JSON Lines) to check")
    parser.add_argument("--max-lines", type=int, help="check only the first N lines")
    parser.add_argument("--tol", type=float, default=1e-3, help="max allowed |logprob diff|")
    parser.add_argument("--emit", type=Path, help="write the reference's scores of --scored here")
    parser.add_argument("--prompt-text", help="prompt text (tokenized from the GGUF vocabulary)")
    parser.add_argument("--chat", action="store_true", help="wrap --prompt-text as a user turn")
    parser.add_argument("--completion-text", help="completion text to score after --prompt-text")
    parser.add_argument("--generate", type=int, metavar="N", help="greedy-decode N new tokens")
    args = parser.parse_args(argv)
    if not args.scored and not args.prompt_text:
        parser.error("give --scored FILE or --prompt-text TEXT")

    started = time.perf_counter()
    model = ReferenceLlama(args.gguf)
    c = model.config
    print(
        f"loaded {args.gguf.name}: {c.n_layers} layers, d_model {c.d_model}, heads "
        f"{c.n_heads}/{c.n_kv_heads}, vocab {model.lm_head.shape[0]} "
        f"({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )

    if args.scored:
        rows = read_jsonl(args.scored, args.max_lines)
        if args.emit:
            with open(args.emit, "w", encoding="utf-8") as out:
                for row in rows:
                    logprobs = model.completion_logprobs(row["prompt_ids"], row["completion_ids"])
                    row = scored_row(row["prompt_ids"], row["completion_ids"], logprobs)
                    out.write(json.dumps(row) + "\n")
            print(f"wrote {len(rows)} lines to {args.emit}", file=sys.stderr)
            return 0
        return 0 if compare(model, rows, args.tol) else 1

    tokenizer = build_tokenizer(model.reader)
    prompt = chatml_user_turn(args.prompt_text) if args.chat else args.prompt_text
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    print(f"prompt_ids: {json.dumps(prompt_ids)}")
    if args.completion_text is not None:
        completion_ids = tokenizer.encode(args.completion_text, add_special_tokens=False).ids
        logprobs = model.completion_logprobs(prompt_ids, completion_ids)
        print(json.dumps(scored_row(prompt_ids, completion_ids, logprobs)))
    if args.generate:
        t0 = time.perf_counter()
        new_ids = model.greedy(prompt_ids, args.generate)
        elapsed = time.perf_counter() - t0
        print(f"greedy_ids: {json.dumps(new_ids)}")
        print(f"greedy_text: {json.dumps(tokenizer.decode(new_ids, skip_special_tokens=False))}")
        print(f"({len(new_ids)} tokens in {elapsed:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
