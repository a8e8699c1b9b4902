"""Throughput per quant type, whether training's in-place edits reach each fast path, and the accuracy.

    python scripts/bench_formats.py [--types Q4_0,Q4_1,Q5_0,Q8_0,Q4_K_M] [--threads N] [--quick]
                                    [--work DIR] [--json bench_formats.json]

Every type is made from the default model (SmolLM2-135M-Instruct Q4_1,
used as it is for Q4_1): its matrices are dequantized into an F16 GGUF
(``qes_edge.convert``) and llama.cpp's own quantizer (``llama_model_quantize``,
its default mix for the type, as the files people download are made) writes
the type.  K-quants need rows of 256: this model's 576-wide matrices get
the quantizer's fallback type, so a Q4_K_M file mixes types (listed).

Per type and per weight layout (as mapped from the file, which is what
training edits in place; and repacked, llama.cpp's private copy in the
layouts its faster kernels want): bare ``llama_decode`` tokens/s of prompt
processing (64 tokens a sequence) and of generation (one token a sequence a
step), for one sequence and for 16 together.  ``edits_reach``: whether a
byte written into the mapped file changes the next logits (a direct test,
not an assumption).  ``heldout``: the base model's held-out accuracy on the
arithmetic task (n = 128, the same items for every type), so a faster type
is only recommended where it costs no accuracy.

Prints a table, writes JSON, and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from bench_eval import raw_decode  # scripts/ is on sys.path when a script runs
from llama_cpp import llama_cpp as llama

from qes_edge.convert import convert_matrices
from qes_edge.evaluator import Evaluator
from qes_edge.files import make_working_copy
from qes_edge.api import Settings, default_model_path, open_model, open_scorer

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K_M")


def make_type(source: Path, kind: str, work: Path) -> Path:
    """The default model as ``kind``: the file itself for Q4_1, else llama.cpp's quantizer from an F16 copy."""
    if kind == "Q4_1":
        return source
    path = work / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if path.exists():
        return path
    f16 = work / "f16.gguf"
    if not f16.exists():
        convert_matrices(source, f16, "F16")
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = os.cpu_count() or 1
    if llama.llama_model_quantize(str(f16).encode(), str(path).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {f16} to {kind}")
    return path


def edits_reach(model: Path, repack: bool, work: Path, threads: int | None) -> bool:
    """Does zeroing the first trainable tensor's bytes in the mapped file change the next logits?"""
    live = make_working_copy(model, work / "edit-probe.gguf")
    try:
        first = open_model(live).trainable[0]
        with Evaluator(live, n_seq_max=1, n_threads=threads, repack=repack) as ev:
            before = ev.logits("The capital of France is")
            buf = np.memmap(live, dtype=np.uint8, mode="r+")
            buf[first.offset:first.offset + first.n_bytes] = 0
            buf.flush()
            del buf
            after = ev.logits("The capital of France is")
        return not np.array_equal(before, after)
    finally:
        live.unlink()


def heldout_accuracy(model: Path, threads: int | None, n: int) -> tuple[float, float]:
    settings = Settings(task="arithmetic", prompt_format="auto", seed=0, heldout=n)
    with open_scorer(model, settings, open_model(model), threads=threads) as scorer:
        result = scorer.heldout()
    return result.accuracy, result.accuracy_se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    parser.add_argument("--quick", action="store_true", help="16-token prompts, 8 steps, one run, held-out n = 16")
    parser.add_argument("--work", type=Path, default=None, help="keep the made models here (default: temporary)")
    parser.add_argument("--json", type=Path, default=Path("bench_formats.json"))
    args = parser.parse_args()
    source = default_model_path()
    n_prompt, n_gen, repeat, n_heldout = (16, 8, 1, 16) if args.quick else (64, 32, 3, 128)
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for kind in args.types.split(","):
            model = make_type(source, kind, work)
            info = open_model(model)
            types = sorted({t.type_name for t in info.trainable})
            row = {"type": kind, "file_mib": round(model.stat().st_size / 2**20, 1), "trainable_types": types,
                   "trainable_codes": info.trainable_codes}
            for repack in (False, True):
                layout = "repacked" if repack else "mapped"
                with Evaluator(model, n_seq_max=16, n_threads=args.threads, repack=repack) as ev:
                    ev.generate(["Hello"], 2)  # warm-up: page the weights in
                    for n_seq in (1, 16):
                        prompt, generation = raw_decode(ev, n_seq, n_prompt, n_gen, repeat)
                        row[f"{layout}_prompt_tok_s_{n_seq}"] = round(prompt, 1)
                        row[f"{layout}_generation_tok_s_{n_seq}"] = round(generation, 1)
                row[f"{layout}_edits_reach"] = edits_reach(model, repack, work, args.threads)
            row["heldout_accuracy"], row["heldout_accuracy_se"] = heldout_accuracy(model, args.threads, n_heldout)
            rows.append(row)

    print(f"bare llama_decode tokens/s, {n_prompt}-token prompts, {n_gen} generation steps, best of {repeat}; "
          f"load average {load:.2f}; held-out: arithmetic, n = {n_heldout}")
    header = (f"{'type':<7} {'MiB':>5} {'layout':<9} {'prompt 1':>9} {'prompt 16':>10} {'gen 1':>7} {'gen 16':>7} "
              f"{'edits reach':>12} {'held-out':>14}  trainable types")
    print(header)
    for row in rows:
        for layout in ("mapped", "repacked"):
            print(f"{row['type']:<7} {row['file_mib']:>5} {layout:<9} "
                  f"{row[f'{layout}_prompt_tok_s_1']:>9} {row[f'{layout}_prompt_tok_s_16']:>10} "
                  f"{row[f'{layout}_generation_tok_s_1']:>7} {row[f'{layout}_generation_tok_s_16']:>7} "
                  f"{str(row[f'{layout}_edits_reach']):>12} "
                  f"{row['heldout_accuracy']:>7.3f} ± {row['heldout_accuracy_se']:.3f}  {','.join(row['trainable_types'])}")
    result = {"model": source.name, "threads": args.threads, "quick": args.quick, "load_average": round(load, 2),
              "prompt_tokens": n_prompt, "generation_steps": n_gen, "repeat": repeat, "heldout_n": n_heldout,
              "rows": rows}
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
