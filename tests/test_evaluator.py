"""The evaluator on the real default model: batched greedy decoding equals
one-at-a-time decoding, edits to the live file are seen without a reload, and
log-probabilities are what the logits say."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from llama_cpp import Llama
from llama_cpp import llama_cpp as llama

from qes_edge.errors import QesError
from qes_edge.evaluator import Completion, Evaluator
from qes_edge.cpu import physical_cores
from qes_edge.stock_llama import amx_kernel_built, stock_llama
from qes_edge.tasks import accuracy_with_stderr, load_task

QUESTIONS = [
    "What is 2+3?", "Name a color.", "Write a haiku about the sea.", "Translate 'bonjour' to English.",
    "What is the capital of France?", "Count from 1 to 5.", "Say hello in Japanese.", "Is 17 prime?",
    "Give me a word that rhymes with cat.", "What is 12 times 11?",
]
PROMPTS = (
    [[{"role": "user", "content": q}] for q in QUESTIONS]
    + [[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q}] for q in QUESTIONS[:4]]
    + [[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact about cats."}]]
    + ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "1, 1, 2, 3, 5, 8,", "Café, naïve, 東京:"]
)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def evaluator(default_model):
    with Evaluator(default_model) as ev:
        yield ev


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def one_at_a_time(llm: Llama, tokens: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with the high-level API, from a clean cache, up to EOG."""
    llm.reset()
    generated = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if llama.llama_vocab_is_eog(llm._model.vocab, token) or len(generated) == max_tokens:
            break
        generated.append(token)
    return generated


# Bytes per block, and where its 4-bit codes start (after the fp16 scale, and min).
BLOCK_LAYOUT = {"Q4_0": (18, 2), "Q4_1": (20, 4)}


def code_bytes(live_file: np.memmap, tensor) -> np.ndarray:
    """A writable view of the code bytes of every block of tensor (scales excluded)."""
    block_size, codes_start = BLOCK_LAYOUT[tensor.tensor_type.name]
    blocks = live_file[tensor.data_offset : tensor.data_offset + tensor.n_bytes].reshape(-1, block_size)
    return blocks[:, codes_start:]


def matrix(path, quant: str, name_prefix: str = "blk.0.attn_q"):
    return next(t for t in GGUFReader(path).tensors
                if t.tensor_type == GGMLQuantizationType[quant] and t.name.startswith(name_prefix))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture
def reference_llama():
    """``reference_llama(path)``: the high-level Llama, loaded like the evaluator
    loads (no weight repacking), so both run the same kernels on the same bytes."""
    opened = []

    def load(path) -> Llama:
        opened.append(stock_llama(path, repack=False, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False))
        return opened[-1]

    yield load
    for llm in opened:
        llm.close()


@pytest.mark.parametrize("quant", ["Q4_1", pytest.param("Q4_0", marks=pytest.mark.slow),
                                   pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_batched_generation_equals_one_at_a_time(quant, model_of_type, reference_llama):
    # 20 prompts with n_seq_max=16: two waves, the second partly empty.
    with Evaluator(model_of_type(quant), n_seq_max=16, n_threads=2) as ev:
        completions = ev.generate(PROMPTS, MAX_TOKENS)
        prompt_tokens = [ev.tokenize(p) for p in PROMPTS]
    llm = reference_llama(model_of_type(quant))
    for prompt, tokens, completion in zip(PROMPTS, prompt_tokens, completions):
        assert completion.tokens == one_at_a_time(llm, tokens, MAX_TOKENS), prompt
    # The chat template and the text agree with the high-level chat API too.
    for prompt, completion in zip(PROMPTS, completions):
        if isinstance(prompt, list):
            llm.reset()
            reply = llm.create_chat_completion(prompt, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                               repeat_penalty=1.0, max_tokens=MAX_TOKENS)
            text = reply["choices"][0]["message"]["content"]
            if completion.text.endswith("\ufffd"):
                # Cut mid-character by max_tokens: llama-cpp-python generates
                # past max_tokens to finish the character, we stop and say so.
                assert text.startswith(completion.text.rstrip("\ufffd")), prompt
            else:
                assert text == completion.text, prompt
    assert {c.finish_reason for c in completions} == {"eog", "length"}
    for c in completions:
        assert (c.finish_reason == "length") == (len(c.tokens) == MAX_TOKENS)


def test_results_do_not_depend_on_the_batch(evaluator):
    # Chat prompts share the system prompt, decoded once for all; the copies
    # of one prompt share all but its last tokens; "Hi" shares nothing.
    prompts = PROMPTS[:3] + [PROMPTS[4]] * 2 + ["Hi", PROMPTS[-1]]
    alone = [evaluator.generate([p], 8)[0] for p in prompts]
    assert evaluator.generate(prompts, 8) == alone
    completions = [c.tokens for c in alone]
    assert evaluator.logprob(prompts, completions) == [evaluator.logprob([p], [c])[0]
                                                       for p, c in zip(prompts, completions)]


def test_chat_prompt_uses_the_models_template(evaluator):
    text = evaluator.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    tokens = evaluator.tokenize([{"role": "user", "content": "Hi"}])
    assert tokens[0] == 1  # <|im_start|> parsed as the special token, no BOS added
    assert evaluator.tokenize(tokens) == tokens


def test_stop_string_cuts_the_text(evaluator):
    prompt = "1, 2, 3, 4, 5,"
    (free,) = evaluator.generate([prompt], 16)
    assert free.text.count(",") >= 2
    (stopped,) = evaluator.generate([prompt], 16, stop=[","])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(",")]
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]
    assert "," in evaluator.detokenize(stopped.tokens)


def test_detokenize_keeps_multibyte_characters_whole(evaluator):
    text = "Café 東京 🙂"
    assert evaluator.detokenize(evaluator.tokenize(text)) == text


@pytest.mark.parametrize("quant", ["Q4_1", "Q4_0"])
def test_edits_to_the_live_file_are_seen_without_reload(quant, model_of_type, tmp_path):
    # Q4_0 is a type llama.cpp would repack into private buffers on x86:
    # the evaluator must see the edits anyway.
    live = shutil.copyfile(model_of_type(quant), tmp_path / f"live.{quant}.gguf")
    tensor = matrix(live, quant)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    with Evaluator(live) as ev:
        logits_before = ev.logits(prompt)
        completion_before = ev.generate([prompt], 12)

        codes = code_bytes(np.memmap(live, dtype=np.uint8, mode="r+"), tensor)
        original = codes.copy()
        codes[:] = np.random.default_rng(0).integers(0, 256, codes.shape, dtype=np.uint8)
        assert not np.array_equal(ev.logits(prompt), logits_before)

        codes[:] = original
        assert np.array_equal(ev.logits(prompt), logits_before)  # bit-identical, no reload
        assert ev.generate([prompt], 12) == completion_before
    assert live.read_bytes() == model_of_type(quant).read_bytes()


def test_repacked_weights_run_or_are_refused_with_the_reason(default_model):
    # llama.cpp's AMX kernel, built into llama-cpp-python on an AMX CPU, segfaults on repacked weights.
    if amx_kernel_built():
        with pytest.raises(QesError, match="AMX kernel"):
            Evaluator(default_model, repack=True)
        return
    with Evaluator(default_model, repack=True) as ev:
        assert 1 <= len(ev.generate(PROMPTS[:1], 4)[0].tokens) <= 4


def test_one_copy_of_the_weights(tmp_model_copy):
    tensor = matrix(tmp_model_copy, "Q4_1", "blk.0.ffn_down")
    with Evaluator(tmp_model_copy) as ev:
        ev.generate(PROMPTS[:16], 16)  # the first candidate pages the weights in
        rss_first = rss_bytes()
        codes = code_bytes(np.memmap(tmp_model_copy, dtype=np.uint8, mode="r+"), tensor)
        original = codes.copy()
        codes[:] = np.random.default_rng(1).integers(0, 256, codes.shape, dtype=np.uint8)
        ev.generate(PROMPTS[:16], 16)  # the second candidate
        growth = rss_bytes() - rss_first
        codes[:] = original
    assert growth < tmp_model_copy.stat().st_size / 2


def test_logprob_equals_sum_of_per_token_log_softmax(evaluator):
    prompts = [[{"role": "user", "content": "What is 2+3?"}], "Once upon a time", PROMPTS[2]]
    completions = [c.tokens for c in evaluator.generate(prompts, 10)]
    completions[1] = evaluator.completion_tokens(" there was a dragon who liked tea.")  # not greedy's pick
    scores = evaluator.logprob(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores):
        context = evaluator.tokenize(prompt)
        expected = 0.0
        for token in completion:
            expected += log_softmax(evaluator.logits(context))[token]
            context = context + [token]
        assert score == pytest.approx(expected, abs=1e-9)
        assert score < 0


def test_logprob_of_text_and_edge_cases(evaluator):
    prompt = "The capital of France is"
    text_score, token_score, empty = evaluator.logprob(
        [prompt, prompt, prompt], [" Paris", evaluator.completion_tokens(" Paris"), ""])
    assert text_score == token_score
    assert empty == 0.0
    assert -5 < text_score < 0
    # Far more sequences than one context holds: waves, same answers.
    many = evaluator.logprob([prompt] * 40, [" Paris"] * 40)
    assert many == [text_score] * 40


def test_logits_shape(evaluator):
    logits = evaluator.logits("Hello")
    assert logits.shape == (evaluator.n_vocab,) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_not_a_model_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_text("this is not a GGUF file\n")
    with pytest.raises(QesError, match="cannot load"):
        Evaluator(junk)
    with pytest.raises(QesError, match="not found"):
        Evaluator(tmp_path / "missing.gguf")


def test_too_long_prompt_is_a_clear_error(evaluator):
    long_prompt = "word " * (evaluator.n_ctx_seq + 10)
    with pytest.raises(QesError, match=r"prompt 1 has \d+ tokens"):
        evaluator.generate(["short", long_prompt], 4)
    with pytest.raises(QesError, match="prompt 0"):
        evaluator.logprob([long_prompt], ["x"])
    # The evaluator still works afterwards.
    assert isinstance(evaluator.generate(["short"], 2)[0], Completion)


def test_context_failure_is_a_clear_error(default_model):
    # llama.cpp allows at most 256 sequences in one context.
    with pytest.raises(QesError, match="cannot create a context.*n_seq_max=300"):
        Evaluator(default_model, n_seq_max=300, n_batch=512)


@pytest.mark.unit
def test_default_threads_are_physical_cores():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_default_model_has_room_to_learn_arithmetic(default_model):
    """Greedy, the default model gets some of the arithmetic task right and some wrong (docs/how-it-works.md, "arithmetic (the default)")."""
    llm = stock_llama(default_model, n_ctx=512, n_threads=2, verbose=False)
    try:
        task = load_task("arithmetic")
        flags = []
        for item in task.heldout[:16]:
            out = llm.create_chat_completion(item.prompt, temperature=0, max_tokens=task.max_tokens,
                                             stop=list(task.stop))
            flags.append(task.correct(out["choices"][0]["message"]["content"], item))
    finally:
        llm.close()
    accuracy, _ = accuracy_with_stderr(flags)
    assert 0 < accuracy < 1
