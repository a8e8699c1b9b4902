"""GGUF models in the shapes people run (Llama 3.2 1B/3B, Qwen2.5 7B), with random codes: for measuring cost.

    python scripts/scale_models.py SHAPE [--mix q4_k_m|q4_0] [--out DIR] [--seed 0]

No model above 270M parameters comes from the package registries this
project can reach, so the scale benchmark (scripts/bench_scale.py) makes its
own: every tensor of the real architecture at its real shape and in the
quant type llama.cpp's ``llama-quantize`` gives it in that file type, the
codes random (a seeded generator per tensor) and the scales chosen so that
every weight is about N(0, 0.02²), as a trained model's are.  The model's
output is noise; its cost (memory, disk, time per token, QES's own work) is
a real model's of that shape.

The mixes, as ``llama_tensor_get_type`` picks them:

- ``q4_k_m``: Q4_K everywhere, but Q6_K for the output matrix (the token
  embedding when the model ties them) and for ``attn_v`` and ``ffn_down`` in
  the layers ``use_more_bits`` picks (the first and last eighth, and every
  third between);
- ``q4_0``: Q4_0 everywhere, the output matrix (or the tied embedding) Q6_K.

Norms are F32 ones and Qwen2's q/k/v biases F32 zeros.  The tokenizer is the
demo model's (SmolLM2's BPE, 49,152 tokens), padded with unused tokens to the
shape's vocabulary, so the embedding and output matrices have their real
size.  Files are generated, never committed: a 7B model is 4.7 GB.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from qes_edge.formats import FORMATS
from qes_edge.models import default_model_path

WEIGHT_STD = 0.02
UNUSED_TOKEN = 5  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED: never matched by the tokenizer


@dataclass(frozen=True)
class Shape:
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    tied: bool  # the output matrix is the token embedding
    rope_base: float
    biases: bool = False  # Qwen2: q, k and v projections have biases

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, GGUF shape [columns, rows], role) of every tensor; role picks the quant type."""
        e, kv, f = self.n_embd, self.n_head_kv * self.head_dim, self.n_ff
        out = [("token_embd.weight", (e, self.n_vocab), "output" if self.tied else "embedding")]
        for i in range(self.n_layer):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (e,), "norm"),
                    (b + "attn_q.weight", (e, e), "matrix"), (b + "attn_k.weight", (e, kv), "matrix"),
                    (b + "attn_v.weight", (e, kv), "more_bits"), (b + "attn_output.weight", (e, e), "matrix")]
            if self.biases:
                out += [(b + "attn_q.bias", (e,), "bias"), (b + "attn_k.bias", (kv,), "bias"),
                        (b + "attn_v.bias", (kv,), "bias")]
            out += [(b + "ffn_norm.weight", (e,), "norm"), (b + "ffn_gate.weight", (e, f), "matrix"),
                    (b + "ffn_up.weight", (e, f), "matrix"), (b + "ffn_down.weight", (f, e), "more_bits")]
        out.append(("output_norm.weight", (e,), "norm"))
        if not self.tied:
            out.append(("output.weight", (e, self.n_vocab), "output"))
        return out

    def params(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.tensors())


SHAPES = {
    "llama-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128256, tied=True, rope_base=500000.0),  # Llama 3.2 1B
    "llama-3b": Shape("llama", 3072, 28, 24, 8, 8192, 128256, tied=True, rope_base=500000.0),  # Llama 3.2 3B
    "qwen2-7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 152064, tied=False, rope_base=1000000.0,
                      biases=True),  # Qwen2.5 7B
    "tiny": Shape("llama", 256, 2, 4, 2, 512, 49200, tied=True, rope_base=10000.0),  # for the tests: 48 unused tokens
}
MIXES = ("q4_k_m", "q4_0")
FILE_TYPE = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def quant_type(name: str, role: str, mix: str, layers: int) -> QT:
    if role in ("norm", "bias"):
        return QT.F32
    if role == "output":
        return QT.Q6_K
    if mix == "q4_0":
        return QT.Q4_0
    if role == "more_bits" and use_more_bits(int(name.split(".")[1]), layers):
        return QT.Q6_K
    return QT.Q4_K


def f16(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float16).view(np.uint8)


def model_like_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` blocks of ``qtype``: uniform random codes, every block's scales the same, chosen so the
    weights have mean about 0 and standard deviation about WEIGHT_STD."""
    fmt = FORMATS[qtype]
    raw = np.frombuffer(rng.bytes(n_blocks * fmt.block_bytes), dtype=np.uint8).reshape(n_blocks, fmt.block_bytes)
    raw = raw.copy()
    if qtype == QT.Q4_0:  # d, then 16 bytes of nibbles; w = d (q - 8), q uniform 0..15 (sd 4.61)
        raw[:, 0:2] = f16(WEIGHT_STD / 4.61)
    elif qtype == QT.Q4_K:  # d, dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles; w = d sc q - dmin m
        d = WEIGHT_STD / (32 * 4.61)
        raw[:, 0:2], raw[:, 2:4] = f16(d), f16(d * 7.5)  # every sc = m = 32: the mean of q is 7.5
        raw[:, 4:16] = [160] * 8 + [0] * 4  # 32 | 2 << 6: the low 6 bits of scales 0-3 and the high bits of 4-7
    elif qtype == QT.Q6_K:  # ql[128], qh[64], int8 scales[16], d; w = d sc (q - 32), q uniform 0..63 (sd 18.5)
        raw[:, 192:208] = 16
        raw[:, 208:210] = f16(WEIGHT_STD / (16 * 18.5))
    else:
        raise ValueError(f"no model-like blocks for {qtype.name}")
    return raw


def tensor_data(shape: tuple[int, ...], qtype: QT, role: str, rng: np.random.Generator) -> np.ndarray:
    if qtype == QT.F32:
        return np.full(shape[::-1], 1.0 if role == "norm" else 0.0, dtype=np.float32)
    fmt = FORMATS[qtype]
    rows, columns = int(np.prod(shape[1:])), shape[0]
    blocks = model_like_blocks(qtype, rows * columns // fmt.block_elems, rng)
    return blocks.reshape(rows, columns // fmt.block_elems * fmt.block_bytes)


def tokenizer_fields(reader: GGUFReader, n_vocab: int) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """The demo model's tokenizer and chat template, its vocabulary padded with unused tokens to ``n_vocab``."""
    fields = []
    for field in reader.fields.values():
        if not (field.name.startswith("tokenizer.") or field.name == "general.quantization_version"):
            continue
        value = field.contents()
        if field.name == "tokenizer.ggml.tokens":
            value = value + [f"<unused_{i}>" for i in range(n_vocab - len(value))]
        elif field.name == "tokenizer.ggml.token_type":
            value = value + [UNUSED_TOKEN] * (n_vocab - len(value))
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        fields.append((field.name, value, field.types[0], sub_type))
    return fields


def make_model(shape_name: str, mix: str, out_dir: Path, seed: int = 0) -> Path:
    """Write (once) and return ``out_dir/<shape>-<mix>.gguf``; tensors stream to disk one at a time."""
    shape = SHAPES[shape_name]
    path = Path(out_dir) / f"{shape_name}-{mix}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(tmp, arch=shape.arch)
    a = shape.arch
    writer.add_string("general.name", f"qes-edge scale model {shape_name} {mix} (random codes)")
    writer.add_uint32("general.file_type", int(FILE_TYPE[mix]))
    for key, value in (("block_count", shape.n_layer), ("context_length", 8192),
                       ("embedding_length", shape.n_embd), ("feed_forward_length", shape.n_ff),
                       ("attention.head_count", shape.n_head), ("attention.head_count_kv", shape.n_head_kv),
                       ("vocab_size", shape.n_vocab), ("rope.dimension_count", shape.head_dim)):
        writer.add_uint32(f"{a}.{key}", value)
    writer.add_float32(f"{a}.rope.freq_base", shape.rope_base)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    for name, value, kind, sub_type in tokenizer_fields(GGUFReader(default_model_path()), shape.n_vocab):
        writer.add_key_value(name, value, kind, sub_type=sub_type)
    plan = [(name, dims, role, quant_type(name, role, mix, shape.n_layer)) for name, dims, role in shape.tensors()]
    for name, dims, role, qtype in plan:
        if qtype == QT.F32:
            writer.add_tensor_info(name, dims[::-1], np.dtype(np.float32), 4 * int(np.prod(dims)))
        else:
            fmt = FORMATS[qtype]
            n_bytes = int(np.prod(dims)) // fmt.block_elems * fmt.block_bytes
            writer.add_tensor_info(name, (int(np.prod(dims[1:])), n_bytes // int(np.prod(dims[1:]))),
                                   np.dtype(np.uint8), n_bytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, (name, dims, role, qtype) in enumerate(plan):
            writer.write_tensor_data(tensor_data(dims, qtype, role, np.random.default_rng([seed, index])))
    finally:
        writer.close()
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--mix", choices=MIXES, default="q4_k_m")
    parser.add_argument("--out", type=Path, default=Path("scale-models"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_model(args.shape, args.mix, args.out, args.seed)
    print(f"{path}: {SHAPES[args.shape].params() / 1e9:.2f} B parameters, {path.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
