#!/usr/bin/env python3
"""Write a tiny random llama GGUF model, self-contained (own tokenizer).

Used by `cargo xtask models` so the end-to-end tests need no download: the
model is small enough to generate in a second, yet every weight matmul has
K and M >= 64, so it exercises the same MUL_MAT path a real model does.

Vocabulary: SentencePiece ("llama") style, 448 tokens: <unk>, <s>, </s>,
256 byte-fallback tokens <0x00>..<0xFF>, the word-start marker U+2581, and
every printable ASCII character alone and prefixed by U+2581.

Weights are seeded Gaussians scaled by 1/sqrt(fan_in) so every layer
contributes (the residual stream is not just the token embedding) and the
logits are spread out: greedy decoding then produces varied text rather than
one repeated token, and argmax decisions have clear margins.

Usage:
  make_tiny_llama.py OUT.gguf [--dim 256] [--layers 2] [--heads 4]
      [--kv-heads 2] [--ff 512] [--ctx 512] [--dtype f32|f16|q8_0|q4_0]
      [--logit-scale 4.0] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import gguf

WORD = "\u2581"

FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, None),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, None),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}


def build_vocab(extra: int = 0):
    """(tokens, scores, token types) of the 448-token SPM vocabulary, plus `extra` filler words
    (for LM heads wider than a chip's axis limit)."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(T.BYTE)
    tokens.append(WORD)
    scores.append(-1.0)
    types.append(T.NORMAL)
    for i, c in enumerate(chr(x) for x in range(0x21, 0x7F)):
        tokens.append(c)
        scores.append(-2.0 - i * 1e-3)
        types.append(T.NORMAL)
        tokens.append(WORD + c)
        scores.append(-1.5 - i * 1e-3)
        types.append(T.NORMAL)
    for i in range(extra):
        # Long, low-scored words the tokenizer never picks for ASCII prompts.
        tokens.append(f"{WORD}zz{i:06d}")
        scores.append(-1000.0 - i * 1e-3)
        types.append(T.NORMAL)
    return tokens, scores, types


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ff", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(FILE_TYPES), default="f16")
    ap.add_argument("--head", choices=["succ", "random"], default="succ",
                    help="output head: successor map (robust greedy text) or random")
    ap.add_argument("--layer-gain", type=float, default=0.5,
                    help="gain of attn_output/ffn_down (how much layers move the residual)")
    ap.add_argument("--logit-scale", type=float, default=4.0, help="std of the output logits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", type=int, default=0,
                    help="mixture of experts: this many FFN experts per layer (Mixtral-style llama), "
                         "their matmuls are MUL_MAT_ID nodes")
    ap.add_argument("--experts-used", type=int, default=2, help="experts each token uses")
    ap.add_argument("--extra-vocab", type=int, default=0,
                    help="filler tokens appended to the vocabulary (LM head rows)")
    ap.add_argument("--overflow-gain", type=float, default=1.0,
                    help="multiply layer 0's ffn_gate and ffn_up by this gain, so the FFN hidden "
                         "state (silu(gate) * up, the ffn_down input) grows by about its square: "
                         "400 puts it past fp16's 65504 (tests of the plugin's numeric guard; use "
                         "--dtype f32, whose CPU matmuls keep f32 activations)")
    a = ap.parse_args()

    if a.dim % a.heads or a.heads % a.kv_heads:
        ap.error("--dim must divide by --heads, and --heads by --kv-heads")
    head_dim = a.dim // a.heads
    kv_dim = head_dim * a.kv_heads
    if a.dtype in ("q8_0", "q4_0") and (a.dim % 32 or a.ff % 32):
        ap.error("quantized types need --dim and --ff divisible by 32")

    tokens, scores, types = build_vocab(a.extra_vocab)
    n_vocab = len(tokens)
    file_type, qtype = FILE_TYPES[a.dtype]
    rng = np.random.default_rng(a.seed)

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"tiny-llama-{a.dtype}")
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ff)
    if a.experts:
        w.add_expert_count(a.experts)
        w.add_expert_used_count(a.experts_used)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def matrix(name: str, rows: int, cols: int, std: float, row_gain=None) -> np.ndarray:
        # numpy (rows, cols) == ggml ne = [cols, rows]; cols is the matmul K.
        x = rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)
        if row_gain is not None:
            x *= row_gain[:, None]
        tensor(name, x)
        return x

    def tensor(name: str, x: np.ndarray) -> None:
        if qtype is not None:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        elif a.dtype == "f16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, x)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(a.dim, dtype=np.float32))

    def proj(name: str, rows: int, cols: int, gain: float = 1.0, row_gain=None) -> None:
        matrix(name, rows, cols, gain / np.sqrt(cols), row_gain)

    rng_embd = matrix("token_embd.weight", n_vocab, a.dim, 1.0)
    for i in range(a.layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        proj(p + "attn_q.weight", a.dim, a.dim, 2.0)
        proj(p + "attn_k.weight", kv_dim, a.dim, 2.0)
        proj(p + "attn_v.weight", kv_dim, a.dim)
        proj(p + "attn_output.weight", a.dim, a.dim, a.layer_gain)
        norm(p + "ffn_norm.weight")
        ffn_gain = a.overflow_gain if i == 0 else 1.0
        if a.experts:
            # numpy (n_expert, rows, cols) == ggml ne = [cols, rows, n_expert].
            def experts(name: str, rows: int, cols: int, gain: float) -> None:
                x = rng.normal(0.0, gain / np.sqrt(cols), size=(a.experts, rows, cols))
                tensor(name, x.astype(np.float32))
            proj(p + "ffn_gate_inp.weight", a.experts, a.dim, 4.0)
            experts(p + "ffn_gate_exps.weight", a.ff, a.dim, ffn_gain)
            experts(p + "ffn_up_exps.weight", a.ff, a.dim, ffn_gain)
            experts(p + "ffn_down_exps.weight", a.dim, a.ff, a.layer_gain)
        else:
            proj(p + "ffn_gate.weight", a.ff, a.dim, ffn_gain)
            proj(p + "ffn_up.weight", a.ff, a.dim, ffn_gain)
            proj(p + "ffn_down.weight", a.dim, a.ff, a.layer_gain)
    norm("output_norm.weight")
    normal = np.flatnonzero(np.asarray(types) == gguf.TokenType.NORMAL)
    normal = normal[normal < n_vocab - a.extra_vocab]  # filler words never win
    if a.head == "succ":
        # A "successor" head: the row of token succ(t) is t's embedding, so the last hidden state,
        # which still points mostly along the current token's embedding, picks succ(t) with a wide
        # margin over every other token. Greedy text is then varied (a walk over a permutation of
        # printable tokens, nudged by attention) and robust to the small numeric differences between
        # backends (fp16 vs q8_0 activations), which is what an identical-text test needs. Control
        # and byte tokens keep small random rows so they never win.
        embd = rng_embd
        out = rng.normal(0.0, 0.05 / np.sqrt(a.dim), size=(n_vocab, a.dim)).astype(np.float32)
        succ = rng.permutation(normal)
        out[succ] = embd[normal] * (a.logit_scale / np.sqrt(a.dim))
        tensor("output.weight", out)
    else:
        # RMS-normed hidden state has unit rms, so std(logit) ~= logit_scale.
        # Damp the control and byte-fallback tokens so greedy text is printable.
        out_gain = np.where(np.asarray(types) == gguf.TokenType.NORMAL, 1.0, 0.25).astype(np.float32)
        proj("output.weight", n_vocab, a.dim, a.logit_scale, out_gain)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out} ({a.dtype}, dim {a.dim}, ff {a.ff}, layers {a.layers}, "
          f"heads {a.heads}/{a.kv_heads}, vocab {n_vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
