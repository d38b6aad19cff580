"""Write a llama-architecture GGUF of random weights in Q4_0 (or Q8_0) blocks, of a given shape.

The memory targets of issue 20 name model shapes minilars has no file for: a
Qwen2.5-0.5B-shaped model (llama-shaped: 24 blocks, d 896, f 4864, 14 heads, 2 kv
heads, vocabulary 151,936, tied embeddings) and a SmolLM2-1.7B-shaped one (24 blocks,
d 2048, f 8192, 32 heads, 32 kv heads, vocabulary 49,152). This script writes them
with gguf-py's writer, so `minilars bench memory --model FILE.gguf` loads them as it
loads any GGUF (kept as blocks with --weights keep):

    python benchmarks/random_quantised_gguf.py --shape qwen2.5-0.5b --out runs/qwen0.5b-q4_0.gguf
    python benchmarks/random_quantised_gguf.py --shape smollm2-1.7b --out runs/smollm2-1.7b-q4_0.gguf

The blocks are drawn directly, not quantised from floats: each block's float16 scale
d = 1 / (4.6 sqrt(d_in)) and uniform 4-bit (Q4_0) or 8-bit (Q8_0) values, so a
projection's weights have standard deviation about 1 / sqrt(d_in) (Q4_0: q - 8 is
uniform on -8..7, std 4.6) and activations stay O(1) through the blocks; norms are
1. The file is streamed tensor by tensor (header and tensor table first), so
writing a 1.7B model holds one tensor at a time. There is no tokenizer: the file
declares llama.vocab_size, and the benchmarks feed random token ids.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter

# name -> (blocks, dim, ffn, heads, kv heads, vocabulary, tied)
SHAPES = {
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936, True),
    "smollm2-1.7b": (24, 2048, 8192, 32, 32, 49152, True),
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152, True),
}
FORMATS = {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0}


def tensor_shapes(layers: int, dim: int, ffn: int, heads: int, kv_heads: int, vocab: int, tied: bool):
    """(GGUF name, (rows, cols)) in file order; rows are outputs, as GGUF stores a projection."""
    hd = dim // heads
    out = [("token_embd.weight", (vocab, dim))]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (dim,)), (b + "attn_q.weight", (heads * hd, dim)),
                (b + "attn_k.weight", (kv_heads * hd, dim)), (b + "attn_v.weight", (kv_heads * hd, dim)),
                (b + "attn_output.weight", (dim, heads * hd)), (b + "ffn_norm.weight", (dim,)),
                (b + "ffn_gate.weight", (ffn, dim)), (b + "ffn_up.weight", (ffn, dim)),
                (b + "ffn_down.weight", (dim, ffn))]
    out.append(("output_norm.weight", (dim,)))
    if not tied:
        out.append(("output.weight", (vocab, dim)))
    return out


def random_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols / 32 * type size) uint8: random blocks with values of std ~ 1/sqrt(cols)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = cols // block
    data = np.empty((rows, n_blocks, type_size), dtype=np.uint8)
    spread = 4.6 if qtype == Q.Q4_0 else 73.9  # std of q - 8 on -8..7, of an int8 uniform on -128..127
    d = np.float16(1.0 / (spread * np.sqrt(cols)))
    data[:, :, :2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    data[:, :, 2:] = rng.integers(0, 256, (rows, n_blocks, type_size - 2), dtype=np.uint8)
    return data.reshape(rows, n_blocks * type_size)


def write(path: Path, layers: int, dim: int, ffn: int, heads: int, kv_heads: int, vocab: int, tied: bool,
          fmt: str = "q4_0", seed: int = 0, context: int = 8192) -> Path:
    qtype = FORMATS[fmt]
    block, type_size = GGML_QUANT_SIZES[qtype]
    shapes = tensor_shapes(layers, dim, ffn, heads, kv_heads, vocab, tied)
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"random {fmt} {layers}x{dim}")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_vocab_size(vocab)
    for name, shape in shapes:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = (shape[0], shape[1] // block * type_size)  # gguf-py takes a quantised tensor's bytes' shape
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in shapes:  # the order of the tensor table
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            writer.write_tensor_data(random_blocks(shape[0], shape[1], qtype, rng))
    writer.close()
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a named shape; or give --layers ... --vocab (default: qwen2.5-0.5b)")
    for flag in ("layers", "dim", "ffn", "heads", "kv-heads", "vocab"):
        p.add_argument(f"--{flag}", type=int, default=None, help=f"{flag} of a custom shape")
    p.add_argument("--untied", action="store_true", help="a custom shape with its own output.weight")
    p.add_argument("--format", choices=sorted(FORMATS), default="q4_0", help="block format (default: %(default)s)")
    p.add_argument("--context", type=int, default=8192, help="llama.context_length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .gguf file to write")
    args = p.parse_args(argv)
    custom = [args.layers, args.dim, args.ffn, args.heads, args.kv_heads, args.vocab]
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            p.error("a custom shape needs --layers, --dim, --ffn, --heads, --kv-heads and --vocab")
        shape = (*custom, not args.untied)
    else:
        shape = SHAPES[args.shape or "qwen2.5-0.5b"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, *shape, fmt=args.format, seed=args.seed, context=args.context)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB): {shape[0]} blocks, d {shape[1]}, f {shape[2]}, "
          f"{shape[3]} heads, {shape[4]} kv heads, vocabulary {shape[5]}, {'tied' if shape[6] else 'untied'}, "
          f"{args.format}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
