"""Rewards from llama.cpp on the live, perturbed model.

The Evaluator loads a GGUF through llama-cpp-python's low-level API with the
weights memory-mapped straight from the file (MAP_SHARED, no repacking), so
bytes another part of the program writes into that file through a numpy
memmap are what the very next ``llama_decode`` multiplies with: no reload and
no second copy of the weights. Every call clears the KV cache first, so each
call sees only the model as it is now.

Prompts are decoded together, one sequence per prompt, in one context with
one KV stream per sequence; greedy decoding is an argmax over numpy views of
llama.cpp's logits.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
from llama_cpp import llama_cpp as llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from qes_edge.errors import QesError
from qes_edge.cpu import physical_cores
from qes_edge.stock_llama import amx_kernel_built

Message = Mapping[str, str]
# A plain string, chat messages [{"role": ..., "content": ...}], or token ids.
Prompt = Union[str, Sequence[Message], Sequence[int]]

CONTEXT_PER_PROMPT = 512  # KV cells each prompt's sequence gets: n_ctx = CONTEXT_PER_PROMPT x n_seq_max
BATCH_TOKENS = 512  # the most tokens one forward pass takes (n_batch)
GGML_LOG_LEVEL_ERROR = 3
GGML_LOG_LEVEL_CONT = 5

_llama_errors: list[str] = []  # the last error llama.cpp logged, to explain a failure
_last_level = 0


@llama.llama_log_callback
def _record_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp talks a lot on stderr; keep quiet and remember only errors,
    # which explain why a load or a context failed.
    global _last_level
    if level != GGML_LOG_LEVEL_CONT:
        _last_level = level
    if _last_level == GGML_LOG_LEVEL_ERROR and text:
        _llama_errors.append(text.decode("utf-8", errors="replace"))
        del _llama_errors[:-8]


llama.llama_log_set(_record_errors, ctypes.c_void_p(0))  # the module keeps the reference
llama.llama_backend_init()


def _last_llama_error() -> str:
    message = " ".join("".join(_llama_errors).split())
    _llama_errors.clear()
    return f" (llama.cpp: {message})" if message else ""


def _is_chat(prompt) -> bool:
    return len(prompt) > 0 and isinstance(prompt[0], Mapping)


@dataclass(frozen=True)
class Completion:
    """One greedy continuation.

    ``tokens`` are the generated tokens: they include the token that completed a
    stop string but not an end-of-generation token. ``text`` is their text, cut
    just before the stop string. ``finish_reason`` is "stop" (stop string),
    "eog" (end-of-generation token) or "length" (max_tokens reached).
    """

    text: str
    tokens: list[int]
    finish_reason: str


class _Batch:
    """A llama_batch whose arrays are numpy arrays, filled without per-token Python."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq_id = np.zeros(capacity, np.int32)
        self.output = np.zeros(capacity, np.int8)
        # llama_batch wants one seq_id array per token; each of ours is one
        # element of self.seq_id.
        self.seq_id_ptrs = self.seq_id.ctypes.data + 4 * np.arange(capacity, dtype=np.uintp)

        def ptr(array, ctype):
            return array.ctypes.data_as(ctypes.POINTER(ctype))

        self.struct = llama.llama_batch(
            n_tokens=0,
            token=ptr(self.token, llama.llama_token),
            embd=None,
            pos=ptr(self.pos, llama.llama_pos),
            n_seq_id=ptr(self.n_seq_id, ctypes.c_int32),
            seq_id=ptr(self.seq_id_ptrs, ctypes.POINTER(llama.llama_seq_id)),
            logits=ptr(self.output, ctypes.c_int8),
        )

    def fill(self, token, pos, seq_id, output) -> llama.llama_batch:
        n = len(token)
        self.token[:n], self.pos[:n], self.seq_id[:n], self.output[:n] = token, pos, seq_id, output
        self.struct.n_tokens = n
        return self.struct


class Evaluator:
    """A GGUF model, memory-mapped from its file, that scores prompts with llama.cpp.

    Up to n_seq_max prompts are generated together (more go in waves). n_ctx
    is the whole KV cache, split evenly between the sequences (llama.cpp
    rounds each share up to a multiple of 256): one prompt plus its completion
    must fit in ``n_ctx_seq`` tokens. n_batch is the most tokens one forward
    pass takes; it also bounds llama.cpp's logits buffer (n_batch × n_vocab
    floats). repack lets llama.cpp copy the weights into its repacked
    layouts (faster kernels for some types, but a private copy that edits to
    the file never reach: for benchmarks only). flash_attn switches to
    llama.cpp's flash attention; prompts are then decoded whole, without
    sharing their common prefix.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_seq_max: int = 16,
        n_ctx: int | None = None,
        n_batch: int = BATCH_TOKENS,
        n_threads: int | None = None,
        flash_attn: bool = False,
        repack: bool = False,
    ):
        self._model = self._ctx = None
        self.model_path = Path(model_path)
        self.n_threads = n_threads or physical_cores()
        if not self.model_path.is_file():
            raise QesError(f"model file not found: {self.model_path}")
        if not 1 <= n_seq_max <= n_batch:
            raise QesError(f"n_seq_max must be between 1 and n_batch ({n_batch}), not {n_seq_max}")

        if repack and amx_kernel_built():
            raise QesError("repacked weights on a llama.cpp built with its AMX kernel segfault (llama.cpp issue "
                           "20824): build llama-cpp-python without it (docs/usage.md, 'A CPU with AMX')")
        model_params = llama.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # The weights must stay views of the file: memory-mapped, never
        # repacked into private buffers (unless asked), never read lazily into copies.
        if hasattr(model_params, "load_mode"):  # llama-cpp-python >= 0.3.2x
            model_params.load_mode = llama.LLAMA_LOAD_MODE_MMAP
        else:
            model_params.use_mmap = True
        if hasattr(model_params, "lazy_mode"):
            model_params.lazy_mode = llama.LLAMA_LAZY_MODE_OFF
        model_params.use_extra_bufts = repack
        self._model = llama.llama_model_load_from_file(str(self.model_path).encode(), model_params)
        if not self._model:
            self._model = None
            raise QesError(f"llama.cpp cannot load {self.model_path} as a model{_last_llama_error()}")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)

        context_params = llama.llama_context_default_params()
        context_params.n_seq_max = n_seq_max
        context_params.n_ctx = n_ctx or CONTEXT_PER_PROMPT * n_seq_max
        # One forward pass per llama_decode: we decide how tokens are grouped.
        context_params.n_batch = context_params.n_ubatch = n_batch
        context_params.n_threads = context_params.n_threads_batch = self.n_threads
        context_params.flash_attn_type = (
            llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        # One KV stream per sequence: a sequence attends only to its own
        # cells, laid out as if it were alone.
        context_params.kv_unified = False
        context_params.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, context_params)
        if not self._ctx:
            self._ctx = None
            self.close()
            raise QesError(
                f"llama.cpp cannot create a context (n_ctx={context_params.n_ctx}, "
                f"n_seq_max={n_seq_max}, n_batch={n_batch}){_last_llama_error()}; "
                "try a smaller n_ctx, n_seq_max or n_batch"
            )
        self._memory = llama.llama_get_memory(self._ctx)
        self.n_seq_max = llama.llama_n_seq_max(self._ctx)
        self.n_ctx = llama.llama_n_ctx(self._ctx)
        self.n_ctx_seq = llama.llama_n_ctx_seq(self._ctx)
        self.n_batch = llama.llama_n_batch(self._ctx)
        # Flash attention picks its kernels by the number of query rows, so a
        # prompt decoded as shared prefix + rest would not match it decoded whole.
        self._share_prefixes = not flash_attn
        self._batch = _Batch(self.n_batch)
        self._pieces: dict[int, bytes] = {}
        self._chat_templates: dict[bool, Jinja2ChatFormatter] = {}

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Free the context, then the model. Safe to call twice."""
        if self._ctx is not None:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    # -- text <-> tokens --------------------------------------------------

    def render(self, prompt: str | Sequence[Message]) -> str:
        """The text a prompt stands for: a string as is, chat messages through
        the model's own chat template with the generation prompt appended."""
        if isinstance(prompt, str):
            return prompt
        return self._chat_formatter(generation_prompt=True)(messages=[dict(m) for m in prompt]).prompt

    def _chat_formatter(self, generation_prompt: bool) -> Jinja2ChatFormatter:
        if generation_prompt not in self._chat_templates:
            template = llama.llama_model_chat_template(self._model, None)
            if not template:
                raise QesError(f"{self.model_path.name} has no chat template; use plain string prompts")
            self._chat_templates[generation_prompt] = Jinja2ChatFormatter(
                template=template.decode("utf-8"),
                eos_token=self._token_text(llama.llama_vocab_eos(self._vocab)),
                bos_token=self._token_text(llama.llama_vocab_bos(self._vocab)),
                add_generation_prompt=generation_prompt,
            )
        return self._chat_templates[generation_prompt]

    def reply_tokens(self, prompt: Prompt, reply: str) -> list[int]:
        """The tokens the model writes to answer ``prompt`` with ``reply`` and end its turn.

        Chat messages: the chat template's own assistant turn, up to the
        end-of-generation token it closes the turn with.  A plain prompt: the
        reply's tokens, then end of text unless the reply ends its line (a
        transcript's answer ends at the next question).
        """
        eos = llama.llama_vocab_eos(self._vocab)
        if not _is_chat(prompt):
            tokens = self.completion_tokens(reply)
            return tokens if reply.endswith("\n") else tokens + [eos]
        head = self.render(prompt)
        whole = self._chat_formatter(generation_prompt=False)(
            messages=[*map(dict, prompt), {"role": "assistant", "content": reply}]).prompt
        if whole.startswith(head):
            tokens = self._tokenize(whole[len(head):], add_special=False)
            end = next((i for i, t in enumerate(tokens) if llama.llama_vocab_is_eog(self._vocab, t)), None)
            if end is not None:
                return tokens[:end + 1]
        # A template that rewrites earlier turns, or closes the turn with no end-of-generation token.
        end = eos if llama.llama_vocab_is_eog(self._vocab, eos) else llama.llama_vocab_eot(self._vocab)
        return self.completion_tokens(reply) + [end]

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Prompt tokens as llama-cpp-python makes them, special tokens parsed:
        a plain string gets BOS if the model asks for it, a chat prompt gets
        exactly what its template writes, token ids are used as they are."""
        if isinstance(prompt, str):
            return self._tokenize(prompt, add_special=True)
        if _is_chat(prompt):
            return self._tokenize(self.render(prompt), add_special=False)
        return [int(t) for t in prompt]

    def completion_tokens(self, text: str) -> list[int]:
        """Tokens of a completion as ``logprob`` scores it: special tokens parsed, no BOS."""
        return self._tokenize(text, add_special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of tokens, control tokens omitted; bytes are joined before
        decoding, so characters split across tokens come out whole."""
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        if n < 0:
            raise QesError(f"cannot tokenize text of {len(data)} bytes")
        return list(tokens[:n])

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            piece = self._pieces[token] = buffer.raw[:n]
        return piece

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (llama.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

    def _prompt_tokens(self, prompts: Sequence[Prompt], extra: Sequence[int]) -> list[list[int]]:
        """Tokenize prompts and check each fits its share of the context
        together with extra[i] more tokens."""
        all_tokens = []
        for i, (prompt, n_extra) in enumerate(zip(prompts, extra)):
            tokens = self.tokenize(prompt)
            if not tokens:
                raise QesError(f"prompt {i} is empty")
            if len(tokens) + n_extra > self.n_ctx_seq:
                raise QesError(
                    f"prompt {i} has {len(tokens)} tokens; with {n_extra} more it needs "
                    f"{len(tokens) + n_extra} but each sequence holds {self.n_ctx_seq} "
                    "(raise n_ctx or lower n_seq_max)"
                )
            all_tokens.append(tokens)
        return all_tokens

    # -- decoding ---------------------------------------------------------

    def _decode(self, token, pos, seq_id, output) -> np.ndarray:
        """One llama_decode; returns a view of the logits of the output rows,
        in batch order, valid until the next decode."""
        rc = llama.llama_decode(self._ctx, self._batch.fill(token, pos, seq_id, output))
        if rc != 0:
            raise QesError(
                f"llama_decode failed with code {rc}{_last_llama_error()}; "
                "try a smaller n_seq_max or n_batch"
            )
        n_out = int(np.count_nonzero(output))
        if n_out == 0:
            return np.empty((0, self.n_vocab), np.float32)
        return np.ctypeslib.as_array(llama.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))

    def _prefill(self, sequences: Sequence[Sequence[int]], outputs: Sequence[np.ndarray]):
        """Decode token sequences from an empty cache, sequence i as seq_id i;
        outputs[i] marks the positions whose logits are wanted. Yields
        (seq_id, positions, logits) for each decode that has outputs.

        The prefix all sequences share (a system prompt, a chat template) is
        decoded once and its KV cache copied. The rest of each sequence gets
        decodes of its own, never of one token: mixing sequences of different
        lengths in one decode lets llama.cpp cut them into uneven pieces, and
        a one-token piece goes through other kernels (ggml's vec_dot, not
        llamafile's sgemm) whose rounding flips near-tied greedy choices.
        Decoded this way, every sequence gets bit for bit the logits it gets
        when decoded alone in one piece.
        """
        llama.llama_memory_clear(self._memory, True)
        shared = self._shared_prefix(sequences, outputs) if self._share_prefixes else 0
        if shared:
            for _ in self._decode_pieces(0, sequences[0][:shared], np.zeros(shared, np.int8), 0):
                pass  # no outputs: the prefix only fills the cache
            for seq_id in range(1, len(sequences)):
                llama.llama_memory_seq_cp(self._memory, 0, seq_id, -1, -1)  # done at the next decode
        for seq_id, (tokens, output) in enumerate(zip(sequences, outputs)):
            yield from self._decode_pieces(seq_id, tokens[shared:], output[shared:], shared)

    @staticmethod
    def _shared_prefix(sequences: Sequence[Sequence[int]], outputs: Sequence[np.ndarray]) -> int:
        """How many leading tokens to decode once for all sequences: the common
        prefix, ending before any wanted output and leaving every sequence at
        least two tokens of its own; 0 when that is under two tokens."""
        if len(sequences) < 2:
            return 0
        shortest = min(len(s) for s in sequences)
        limit = min(shortest - 2, *(int(np.argmax(o)) if np.any(o) else len(o) for o in outputs))
        first = np.asarray(sequences[0][: max(limit, 0)])
        shared = len(first)
        for other in sequences[1:]:
            differs = np.flatnonzero(np.asarray(other[:shared]) != first[:shared])
            shared = int(differs[0]) if len(differs) else shared
        return shared if shared >= 2 else 0

    def _decode_pieces(self, seq_id: int, tokens: Sequence[int], output: np.ndarray, start: int):
        """Decode tokens of one sequence from position start in pieces of at
        most n_batch, none of one token unless there is only one; yields
        (seq_id, positions, logits) for pieces with outputs."""
        tokens = np.asarray(tokens, np.int32)
        output = np.asarray(output, np.int8)
        bounds = list(range(0, len(tokens), self.n_batch)) + [len(tokens)]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            bounds[-2] -= 1
        for begin, end in zip(bounds, bounds[1:]):
            pos = np.arange(start + begin, start + end, dtype=np.int32)
            logits = self._decode(tokens[begin:end], pos, np.full(len(pos), seq_id, np.int32), output[begin:end])
            if len(logits):
                yield seq_id, pos[output[begin:end] != 0], logits

    def logits(self, prompt: Prompt) -> np.ndarray:
        """Logits (float32 copy) after the last token of one prompt."""
        (tokens,) = self._prompt_tokens([prompt], [0])
        last = np.zeros(len(tokens), bool)
        last[-1] = True
        *_, (_, _, logits) = self._prefill([tokens], [last])
        return logits[-1].copy()

    def generate(self, prompts: Sequence[Prompt], max_tokens: int, stop: Sequence[str] = ()) -> list[Completion]:
        """Greedy completions of prompts, decoded together as separate sequences.

        A sequence ends at an end-of-generation token, when its text contains
        one of the stop strings, or after max_tokens tokens.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        stops = [s.encode("utf-8") for s in stop if s]
        all_tokens = self._prompt_tokens(prompts, [max_tokens] * len(prompts))
        completions = []
        for first in range(0, len(all_tokens), self.n_seq_max):
            completions += self._generate_wave(all_tokens[first : first + self.n_seq_max], max_tokens, stops)
        return completions

    def _generate_wave(self, prompts: list[list[int]], max_tokens: int, stops: list[bytes]) -> list[Completion]:
        n = len(prompts)
        generated: list[list[int]] = [[] for _ in range(n)]
        text = [bytearray() for _ in range(n)]
        done: list[Completion | None] = [None] * n
        longest_stop = max(map(len, stops), default=0)

        next_token = np.zeros(n, np.int32)
        for seq_id, _, logits in self._prefill(prompts, [np.arange(len(p)) == len(p) - 1 for p in prompts]):
            next_token[seq_id] = logits[-1].argmax()

        active = np.arange(n)
        while True:
            still_active = []
            for i in active:
                token = int(next_token[i])
                if llama.llama_vocab_is_eog(self._vocab, token):
                    done[i] = Completion(text[i].decode("utf-8", errors="replace"), generated[i], "eog")
                    continue
                generated[i].append(token)
                searched_from = max(0, len(text[i]) - longest_stop + 1)
                text[i] += self._piece(token)
                cut = min((c for c in (text[i].find(s, searched_from) for s in stops) if c >= 0), default=-1)
                if cut >= 0:
                    done[i] = Completion(text[i][:cut].decode("utf-8", errors="replace"), generated[i], "stop")
                elif len(generated[i]) == max_tokens:
                    done[i] = Completion(text[i].decode("utf-8", errors="replace"), generated[i], "length")
                else:
                    still_active.append(i)
            if not still_active:
                return done
            active = np.array(still_active)
            token = next_token[active]
            pos = np.array([len(prompts[i]) + len(generated[i]) - 1 for i in active], np.int32)
            logits = self._decode(token, pos, active.astype(np.int32), np.ones(len(active), np.int8))
            next_token[active] = logits.argmax(axis=1)

    def logprob(self, prompts: Sequence[Prompt], completions: Sequence[str | Sequence[int]]) -> list[float]:
        """Sum of log-probabilities (float64) of each completion's tokens given
        its prompt, teacher-forced. A completion is text (tokenized on its own,
        special tokens parsed, no BOS) or a list of token ids."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        targets = [self.completion_tokens(c) if isinstance(c, str) else [int(t) for t in c]
                   for c in completions]
        heads = self._prompt_tokens(prompts, [len(t) for t in targets])
        scores = []
        for first in range(0, len(heads), self.n_seq_max):
            wave = range(first, min(first + self.n_seq_max, len(heads)))
            scores += self._logprob_wave([heads[i] for i in wave], [targets[i] for i in wave])
        return scores

    def _logprob_wave(self, heads: list[list[int]], targets: list[list[int]]) -> list[float]:
        # Logits at position p predict the token at p + 1: a completion needs
        # the outputs from the last prompt token to its own second-to-last.
        full = [h + t for h, t in zip(heads, targets)]
        sequences = [f[:-1] if t else f for f, t in zip(full, targets)]
        outputs = [(np.arange(len(s)) >= len(h) - 1) & bool(t) for s, h, t in zip(sequences, heads, targets)]
        total = np.zeros(len(heads), np.float64)
        for seq_id, positions, logits in self._prefill(sequences, outputs):
            following = np.asarray(full[seq_id])[positions + 1]
            for rows in range(0, len(positions), 64):  # bounds the float64 copy
                x = logits[rows : rows + 64].astype(np.float64)
                peak = x.max(axis=1)
                log_z = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
                total[seq_id] += (x[np.arange(len(x)), following[rows : rows + 64]] - log_z).sum()
        return total.tolist()
