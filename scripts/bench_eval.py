"""Evaluator throughput: batched greedy generation against one prompt at a time.

Measures, on the default model (or --model):
  batched_tok_s      generated tokens/s of Evaluator.generate on 16 chat prompts
                     (wall time, prompt processing included)
  sequential_tok_s   the same prompts one at a time through llama_cpp.Llama
  prompt_tok_s       tokens/s of Evaluator.logprob scoring prompt + completion
  raw_prompt_tok_s,  bare llama_decode, no Python per token: 16 sequences of
  raw_generation_tok_s   64 prompt tokens in one batch, then 16 tokens a step
                     (what llama.cpp alone reaches on this machine)
  batched_over_raw   time the batched workload would take at the raw speeds,
                     divided by the time it took (1.0 = no overhead)

Prints a table, writes JSON (--json), and prints the JSON as its last line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np
from llama_cpp import llama_cpp as llama

from qes_edge.evaluator import Evaluator
from qes_edge.models import default_model_path
from qes_edge.stock_llama import stock_llama

TOPICS = [
    "the moon", "bread", "volcanoes", "the internet", "honey bees", "chess", "rain", "bicycles",
    "glass", "the ocean", "coffee", "trains", "music", "clocks", "maps", "snow",
]


def chat_prompts(n: int) -> list[list[dict]]:
    # Open questions, so that no answer ends before max_tokens.
    return [[{"role": "user", "content": f"Explain in detail how {topic} works, step by step."}]
            for topic in (TOPICS * (n // len(TOPICS) + 1))[:n]]


def timed(fn, repeat: int = 1):
    """fn's result and its best wall time over repeat runs: the machine may be shared."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def raw_decode(ev: Evaluator, n_seq: int, n_prompt: int, n_gen: int, repeat: int) -> tuple[float, float]:
    """Bare llama_decode throughput: one batch of n_seq × n_prompt tokens, then
    n_gen steps of one token per sequence (a fixed token, no sampling)."""
    tokens = np.full(n_seq * n_prompt, 504, np.int32)
    pos = np.tile(np.arange(n_prompt, dtype=np.int32), n_seq)
    seq = np.repeat(np.arange(n_seq, dtype=np.int32), n_prompt)

    def prompt():
        llama.llama_memory_clear(ev._memory, True)
        for chunk in range(0, len(tokens), ev.n_batch):
            part = slice(chunk, chunk + ev.n_batch)
            ev._decode(tokens[part], pos[part], seq[part], (pos[part] == n_prompt - 1).astype(np.int8))

    def generation():
        for step in range(n_gen):
            ev._decode(np.full(n_seq, 504, np.int32), np.full(n_seq, n_prompt + step, np.int32),
                       np.arange(n_seq, dtype=np.int32), np.ones(n_seq, np.int8))

    prompt_s = gen_s = float("inf")
    for _ in range(repeat):
        prompt_s = min(prompt_s, timed(prompt)[1])
        gen_s = min(gen_s, timed(generation)[1])
    return n_seq * n_prompt / prompt_s, n_seq * n_gen / gen_s


@click.command()
@click.option("--model", type=click.Path(exists=True, dir_okay=False), help="GGUF model (default: SmolLM2-135M Q4_1)")
@click.option("--prompts", "n_prompts", default=16, show_default=True)
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--threads", type=int, default=None, help="default: physical cores")
@click.option("--flash-attn", is_flag=True)
@click.option("--repeat", default=3, show_default=True, help="best of this many runs of each measurement")
@click.option("--quick", is_flag=True, help="8 new tokens, 4 sequential prompts, one run each (< 60 s)")
@click.option("--json", "json_path", default="bench_eval.json", show_default=True, type=click.Path(dir_okay=False))
def main(model, n_prompts, max_tokens, threads, flash_attn, repeat, quick, json_path):
    model = Path(model) if model else default_model_path()
    prompts = chat_prompts(n_prompts)
    max_tokens = 8 if quick else max_tokens
    n_sequential = 4 if quick else n_prompts
    raw_prompt, raw_gen = (16, 16) if quick else (64, 64)
    repeat = 1 if quick else repeat
    load_before = os.getloadavg()[0]

    with Evaluator(model, n_threads=threads, flash_attn=flash_attn) as ev:
        n_threads = ev.n_threads
        ev.generate(prompts[:2], 2)  # warm-up: page in the weights
        completions, batched_s = timed(lambda: ev.generate(prompts, max_tokens), repeat)
        generated = sum(len(c.tokens) for c in completions)
        prompt_tokens = sum(len(ev.tokenize(p)) for p in prompts)
        _, logprob_s = timed(lambda: ev.logprob(prompts, [c.tokens for c in completions]), repeat)
        raw_prompt_tok_s, raw_generation_tok_s = raw_decode(
            ev, min(n_prompts, ev.n_seq_max), raw_prompt, raw_gen, repeat)

    llm = stock_llama(model, n_ctx=2048, n_threads=n_threads, n_threads_batch=n_threads,
                      flash_attn=flash_attn, verbose=False)
    try:
        def one_at_a_time():
            return [llm.create_chat_completion(p, temperature=0.0, top_k=1, max_tokens=max_tokens)
                    for p in prompts[:n_sequential]]
        replies, sequential_s = timed(one_at_a_time, repeat)
        sequential_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    finally:
        llm.close()

    result = {
        "model": model.name,
        "n_threads": n_threads,
        "flash_attn": flash_attn,
        "quick": quick,
        "repeat": repeat,
        "load_avg_1m": round(load_before, 2),  # other work on the machine skews everything
        "prompts": n_prompts,
        "max_tokens": max_tokens,
        "generated_tokens": generated,
        "batched_tok_s": round(generated / batched_s, 1),
        "sequential_tok_s": round(sequential_tokens / sequential_s, 1),
        "prompt_tok_s": round((prompt_tokens + generated) / logprob_s, 1),
        "raw_prompt_tok_s": round(raw_prompt_tok_s, 1),
        "raw_generation_tok_s": round(raw_generation_tok_s, 1),
    }
    result["batched_over_sequential"] = round(result["batched_tok_s"] / result["sequential_tok_s"], 2)
    # The same work (these prompts, these generated tokens) at bare llama_decode speed.
    raw_s = prompt_tokens / raw_prompt_tok_s + generated / raw_generation_tok_s
    result["batched_over_raw"] = round(raw_s / batched_s, 2)

    width = max(map(len, result))
    for key, value in result.items():
        click.echo(f"{key:<{width}}  {value}")
    Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
