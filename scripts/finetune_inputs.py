"""Inputs for llama.cpp's `llama-finetune` (the backprop peer QES is compared with).

    nice -n 19 python scripts/finetune_inputs.py f32  [--out build/finetune/smollm2-135m-f32.gguf] [--check 16]
    nice -n 19 python scripts/finetune_inputs.py text [--out build/finetune/arithmetic-train.txt] [--repeat 1]
    nice -n 19 python scripts/finetune_inputs.py meta OUT.gguf [--like build/finetune/smollm2-135m-f32.gguf]

``f32``: the default model (the Q4_1 file QES trains) with every tensor
dequantized to F32 by ``gguf.quants.dequantize`` (llama-finetune trains F32
models only); metadata, tokenizer and chat template copied, ``general.file_type``
set to F32.  Then both files answer the first ``--check`` held-out arithmetic
prompts greedily (llama-cpp-python, 2 threads) and the agreement is printed.

``text``: a task's training split (``--task``, default arithmetic; run seed 0 and
``--heldout`` 128: arithmetic's 79 items; give QES the same seed and --heldout) as SFT text: each item's prompt with its reference reply as
the assistant turn, rendered by the model's own chat template, one conversation
after another.  llama-finetune reads it with ``-f`` and trains next-token loss on
every token of it (prompts and template included), in windows of ``-c`` tokens
taken every ``c/2`` tokens.  Its special tokens (``<|im_start|>``...) are only
parsed as such by the ``--patched`` build of scripts/build_llama_finetune.py.

``meta``: llama-finetune's output loses the chat template and the general.*
keys and says ``llama.context_length`` = the training context; this rewrites it
with the F32 base's metadata (run it before ``qes-edge eval`` or ``llama-quantize``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from qes_edge.convert import copy_metadata, write_and_close
from qes_edge.models import default_model_path
from qes_edge.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "finetune"


def to_f32(src: Path, dest: Path) -> Path:
    """Write ``dest``: ``src`` with every tensor in F32, all metadata copied (file type F32)."""
    reader = GGUFReader(src, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    writer = GGUFWriter(tmp, arch=arch)
    writer.data_alignment = int(reader.alignment)
    copy_metadata(reader, writer, file_type=int(gguf.LlamaFileType.ALL_F32))
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data), raw_dtype=GGMLQuantizationType.F32)
    write_and_close(writer)
    tmp.replace(dest)
    return dest


def restore(finetuned: Path, like: Path, dest: Path) -> Path:
    """Write ``dest``: the tensors of ``finetuned`` under the metadata of ``like`` (its F32 base).

    llama-finetune saves from the in-memory model: it drops ``tokenizer.chat_template`` and
    the general.* keys (qes-edge would then prompt the model as a base model: a few-shot
    transcript) and sets ``llama.context_length`` to the training context."""
    base, tuned = GGUFReader(like, "r"), GGUFReader(finetuned, "r")
    shapes = lambda r: {t.name: (tuple(t.shape), t.tensor_type) for t in r.tensors}  # noqa: E731
    if shapes(base) != shapes(tuned):
        raise SystemExit(f"finetune_inputs: {finetuned} and {like} do not hold the same tensors")
    tmp = dest.with_name(dest.name + ".tmp")
    writer = GGUFWriter(tmp, arch=base.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    writer.data_alignment = int(base.alignment)
    copy_metadata(base, writer)
    for tensor in tuned.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    write_and_close(writer)
    tmp.replace(dest)
    return dest


def formatter(model_path: Path, generation_prompt: bool):
    """The model's own chat template as llama-cpp-python renders it (as qes-edge's evaluator does)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    reader = GGUFReader(model_path, "r")
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    token = lambda key: tokens[reader.get_field(key).contents()] if reader.get_field(key) else ""  # noqa: E731
    return Jinja2ChatFormatter(template=reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents(),
                               eos_token=token(gguf.Keys.Tokenizer.EOS_ID), bos_token=token(gguf.Keys.Tokenizer.BOS_ID),
                               add_generation_prompt=generation_prompt)


def greedy(model_path: Path, items, task, threads: int) -> list[str]:
    """Greedy replies of the model to the items' chat prompts (special tokens parsed, as qes-edge does)."""
    from qes_edge.stock_llama import stock_llama
    llm = stock_llama(model_path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    render = formatter(model_path, generation_prompt=True)
    replies = []
    for item in items:
        tokens = llm.tokenize(render(messages=item.prompt).prompt.encode(), add_bos=False, special=True)
        out = llm.create_completion(tokens, max_tokens=task.max_tokens, temperature=0.0, top_k=1,
                                    stop=list(task.stop) or None)
        replies.append(out["choices"][0]["text"].strip())
        llm.reset()
    del llm
    return replies


def check(base: Path, f32: Path, n: int, threads: int) -> None:
    task = load_task("arithmetic", seed=0, heldout=128)
    items = task.heldout[:n]
    a, b = greedy(base, items, task, threads), greedy(f32, items, task, threads)
    same = sum(x == y for x, y in zip(a, b))
    right = lambda replies: sum(task.correct(r, it) for r, it in zip(replies, items))  # noqa: E731
    for item, x, y in zip(items, a, b):
        if x != y:
            print(f"  differ: {item.prompt[-1]['content'][:16]!r}: Q4_1 {x!r} / F32 {y!r}")
    print(f"greedy agreement on {n} held-out prompts: {same}/{n} identical replies; "
          f"correct: Q4_1 {right(a)}/{n}, F32 {right(b)}/{n}")


def sft_text(model_path: Path, task_spec: str = "arithmetic", seed: int = 0, heldout: int = 128,
             repeat: int = 1, shuffle_seed: int = 0, limit: int | None = None) -> tuple[str, int]:
    """The task's training split as chat conversations (reference reply = assistant turn), concatenated.

    The split is qes-edge's own for ``seed`` and ``heldout`` (``limit``: its first items only);
    items without a reference reply are left out (there are none in the built-in tasks and
    the shipped JSONL tasks)."""
    task = load_task(task_spec, seed=seed, heldout=heldout)
    render = formatter(model_path, generation_prompt=False)
    items = [it for it in task.train if it.reply is not None][:limit]
    rng = random.Random(shuffle_seed)
    parts = []
    for r in range(repeat):
        order = items if r == 0 else rng.sample(items, len(items))  # the split's own order first, then shuffled
        for it in order:
            turns = it.prompt if isinstance(it.prompt, list) else [{"role": "user", "content": it.prompt}]
            parts.append(render(messages=[*turns, {"role": "assistant", "content": it.reply}]).prompt)
    return "".join(parts), len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description="Inputs for llama-finetune: the F32 model, the SFT text.")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("f32", help="write the F32 GGUF of the default model and check it against the Q4_1")
    p.add_argument("--out", type=Path, default=OUT / "smollm2-135m-f32.gguf")
    p.add_argument("--check", type=int, default=16, help="held-out prompts to compare greedily (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rewrite an existing file")
    t = sub.add_parser("text", help="write the arithmetic training split as chat-formatted SFT text")
    t.add_argument("--out", type=Path, default=OUT / "arithmetic-train.txt")
    t.add_argument("--task", default="arithmetic", help="a built-in task or a JSONL file (default arithmetic)")
    t.add_argument("--task-seed", type=int, default=0, help="the run seed whose split is written (default 0)")
    t.add_argument("--heldout", type=int, default=128, help="held-out items (the rest are written)")
    t.add_argument("--items", type=int, help="only the split's first N training items (default: all)")
    t.add_argument("--repeat", type=int, default=1, help="copies of the split (after the first, shuffled)")
    t.add_argument("--seed", type=int, default=0, help="shuffle seed of the repeats")
    m = sub.add_parser("meta", help="put the F32 base's metadata (chat template...) back on llama-finetune's output")
    m.add_argument("finetuned", type=Path, help="the GGUF llama-finetune wrote (-o)")
    m.add_argument("--like", type=Path, default=OUT / "smollm2-135m-f32.gguf", help="its F32 base")
    m.add_argument("--out", type=Path, help="default: rewrite FINETUNED in place")
    args = parser.parse_args()

    base = default_model_path()
    if args.what == "meta":
        print(restore(args.finetuned, args.like, args.out or args.finetuned))
    elif args.what == "f32":
        if args.out.exists() and not args.force:
            print(f"{args.out} exists (--force rewrites it)", file=sys.stderr)
        else:
            to_f32(base, args.out)
        print(args.out)
        if args.check:
            check(base, args.out, args.check, args.threads)
    else:
        text, n = sft_text(base, args.task, args.task_seed, args.heldout, args.repeat, args.seed, args.items)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"{args.out}: {n} items x {args.repeat}, {len(text)} characters")


if __name__ == "__main__":
    main()
