"""scripts/scale_models.py: models in real shapes with random codes, for the scale benchmark.

The cost it measures is only a real model's if the file is one: the quant
type of every tensor as llama.cpp's Q4_K_M and Q4_0 give it, weights of a
trained model's size, a vocabulary of the shape's size, and llama.cpp loads
it and generates.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, quants

from qes_edge.stock_llama import stock_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from scale_models import SHAPES, WEIGHT_STD, make_model, quant_type, use_more_bits  # noqa: E402


@pytest.mark.unit
def test_the_layers_with_more_bits_are_llama_cpps():
    # the first and last eighth, and every third layer between (llama_tensor_get_type's use_more_bits)
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert quant_type("blk.4.ffn_down.weight", "more_bits", "q4_k_m", 16) == QT.Q6_K
    assert quant_type("blk.5.ffn_down.weight", "more_bits", "q4_k_m", 16) == QT.Q4_K
    assert quant_type("blk.4.ffn_down.weight", "more_bits", "q4_0", 16) == QT.Q4_0
    assert quant_type("token_embd.weight", "output", "q4_0", 16) == QT.Q6_K


@pytest.mark.unit
def test_the_shapes_have_the_published_sizes():
    assert round(SHAPES["llama-1b"].params() / 1e9, 2) == 1.24  # Llama 3.2 1B
    assert round(SHAPES["llama-3b"].params() / 1e9, 2) == 3.21  # Llama 3.2 3B
    assert round(SHAPES["qwen2-7b"].params() / 1e9, 2) == 7.62  # Qwen2.5 7B


@pytest.mark.parametrize("mix", ["q4_k_m", "q4_0"])
def test_a_scale_model_is_a_model_llama_cpp_runs(mix, tmp_path):
    path = make_model("tiny", mix, tmp_path)
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == QT.Q6_K  # tied: the embedding is the output matrix
    assert types["blk.0.attn_v.weight"] == (QT.Q4_K if mix == "q4_k_m" else QT.Q4_0)
    assert types["blk.1.attn_v.weight"] == (QT.Q6_K if mix == "q4_k_m" else QT.Q4_0)  # the last eighth
    assert types["blk.0.attn_norm.weight"] == QT.F32
    for tensor in reader.tensors:
        if tensor.tensor_type != QT.F32:
            weights = quants.dequantize(tensor.data, tensor.tensor_type)
            assert np.isfinite(weights).all()
            assert abs(weights.mean()) < 0.003 and abs(weights.std() - WEIGHT_STD) < 0.001, tensor.name
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == SHAPES["tiny"].n_vocab
    llm = stock_llama(path, n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"What is 2 + 3?")) > 3
    assert llm("What is 2 + 3?", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1
    assert make_model("tiny", mix, tmp_path) == path  # made once
