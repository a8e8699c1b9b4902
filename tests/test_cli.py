"""`qes-edge` end to end on the real default model: train, resume, export, inspect, eval, bad input."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from helpers import sha256
from qes_edge.cli import cli
from qes_edge.formats import format_of
from qes_edge.kernels import native
from qes_edge.stock_llama import stock_llama
from qes_edge.tasks import accuracy_with_stderr

def train(workspace, *args):
    runner = CliRunner()
    reward = f"{workspace / 'rewards_for_tests.py'}:score"
    return runner.invoke(cli, ["train", "--task", str(workspace / "data.jsonl"), "--reward", reward, *args])


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_train_writes_a_gguf_that_differs_only_in_trainable_codes(workspace, default_model, tmp_path, tiny):
    before = sha256(default_model)
    out = tmp_path / "tuned.gguf"
    result = train(workspace, str(default_model), *tiny, "--run-dir", str(tmp_path / "run"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sha256(default_model) == before  # the source is never written
    for name in ("state.json", "metrics.jsonl", "reward_curve.png"):
        assert (tmp_path / "run" / name).is_file()

    base, tuned = GGUFReader(default_model), GGUFReader(out)
    base_fields, tuned_fields = fields(base), fields(tuned)
    for key, value in base_fields.items():
        assert tuned_fields[key] == value, key
    provenance = {k: v for k, v in tuned_fields.items() if k.startswith("qes.")}
    assert provenance["qes.base_sha256"] == before and provenance["qes.iterations"] == 2
    assert {"qes.task", "qes.sigma", "qes.alpha", "qes.seed"} <= set(provenance)

    changed = 0
    assert [t.name for t in base.tensors] == [t.name for t in tuned.tensors]
    for a, b in zip(base.tensors, tuned.tensors):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape))
        raw_a, raw_b = np.asarray(a.data).view(np.uint8).reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1)
        fmt = format_of(a.tensor_type)
        trainable = fmt is not None and len(a.shape) == 2 and a.name != "token_embd.weight"
        if not trainable:
            assert np.array_equal(raw_a, raw_b), a.name
            continue
        codes = fmt.read_codes(raw_b)
        only_codes = raw_a.copy()
        fmt.write_codes(only_codes, codes)
        assert np.array_equal(only_codes, raw_b), a.name  # scales and mins untouched
        changed += int(np.sum(codes != fmt.read_codes(raw_a)))
    assert changed > 0

    # Stock llama-cpp-python runs the tuned file, and computes something else than from the base model.
    logits = []
    for path in (default_model, out):
        llm = stock_llama(path, n_ctx=256, logits_all=True, verbose=False)
        try:
            llm.eval(llm.tokenize(b"The capital of France is"))
            logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        finally:
            llm.close()
    assert np.isfinite(logits[1]).all() and not np.array_equal(logits[0], logits[1])


def test_resume_gives_the_bytes_of_an_uninterrupted_run(workspace, default_model, tmp_path, tiny):
    straight = tmp_path / "straight.gguf"
    assert train(workspace, str(default_model), "--iterations", "3", *tiny[2:], "--run-dir", str(tmp_path / "a"),
                 "--out", str(straight)).exit_code == 0

    # stopped after one iteration, then continued
    first = train(workspace, str(default_model), "--iterations", "1", *tiny[2:], "--run-dir", str(tmp_path / "b"))
    assert first.exit_code == 0, first.output
    resumed = tmp_path / "resumed.gguf"
    second = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "b"), "--iterations", "3",
                                      "--out", str(resumed)])
    assert second.exit_code == 0, second.output
    assert sha256(resumed) == sha256(straight)

    # a finished run releases its working copy; continuing it rebuilds the copy from the source
    # (tests/test_crash.py covers copies left dirty by a kill)
    finished = train(workspace, str(default_model), "--iterations", "2", *tiny[2:], "--run-dir", str(tmp_path / "c"))
    assert finished.exit_code == 0, finished.output
    assert json.loads((tmp_path / "c" / "state.json").read_text())["live"] is None
    rebuilt = tmp_path / "rebuilt.gguf"
    third = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "c"), "--iterations", "3",
                                     "--out", str(rebuilt)])
    assert third.exit_code == 0, third.output
    assert sha256(rebuilt) == sha256(straight)

    # export from the run directory gives the same model again
    exported = tmp_path / "exported.gguf"
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "c"), "--out", str(exported), "--ollama"])
    assert result.exit_code == 0, result.output
    assert sha256(exported) == sha256(straight)
    assert (tmp_path / "Modelfile").read_text().splitlines()[0] == "FROM ./exported.gguf"
    assert "ollama create" in result.output


def one_line_error(result):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[-1]


def test_bad_inputs_get_one_clear_line(workspace, default_model, tmp_path, tiny):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    assert "not a GGUF" in one_line_error(train(workspace, str(not_gguf), *tiny, "--run-dir", str(tmp_path / "r1")))

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(default_model.read_bytes()[:5_000_000])
    message = one_line_error(train(workspace, str(truncated), *tiny, "--run-dir", str(tmp_path / "r2")))
    assert "truncated.gguf" in message

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer"\n{"prompt": "e", "answer": "f"}\n')
    message = one_line_error(CliRunner().invoke(cli, ["train", str(default_model), "--task", str(broken), *tiny,
                                                       "--run-dir", str(tmp_path / "r3")]))
    assert "line 2" in message

    raising = f"{workspace / 'rewards_for_tests.py'}:explode"
    message = one_line_error(CliRunner().invoke(cli, ["train", str(default_model), "--task",
                                                       str(workspace / "data.jsonl"), "--reward", raising, *tiny,
                                                       "--run-dir", str(tmp_path / "r4")]))
    assert "item" in message
    assert not (tmp_path / "r4" / "live.dirty").exists()  # the working copy was restored

    assert "even" in one_line_error(train(workspace, str(default_model), *tiny, "--population", "3",
                                          "--run-dir", str(tmp_path / "r5")))


def test_resume_refuses_a_run_of_another_version_or_a_changed_model(workspace, default_model, tmp_path, tiny):
    source = tmp_path / "model.gguf"
    shutil.copyfile(default_model, source)
    for name in ("old", "moved"):
        assert train(workspace, str(source), "--iterations", "1", *tiny[2:],
                     "--run-dir", str(tmp_path / name)).exit_code == 0
    state_path = tmp_path / "old" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "version": 99}))
    message = one_line_error(CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "old"),
                                                       "--iterations", "2"]))
    assert "incompatible" in message

    with open(source, "r+b") as f:  # the base model changed under the run: its updates cannot be replayed
        f.seek(-1, 2)
        f.write(b"\x01")
    message = one_line_error(CliRunner().invoke(cli, ["export", str(tmp_path / "moved"),
                                                       "--out", str(tmp_path / "x.gguf")]))
    assert "changed" in message and not (tmp_path / "x.gguf").exists()


def test_export_to_an_unwritable_place_keeps_the_run(workspace, default_model, tmp_path, tiny):
    assert train(workspace, str(default_model), "--iterations", "1", *tiny[2:], "--run-dir",
                 str(tmp_path / "run"), "--out", str(tmp_path / "first.gguf")).exit_code == 0
    message = one_line_error(CliRunner().invoke(cli, ["export", str(tmp_path / "run"),
                                                       "--out", "/proc/qes-edge-test.gguf"]))
    assert "qes-edge-test.gguf" in message
    again = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "again.gguf")])
    assert again.exit_code == 0, again.output
    assert sha256(tmp_path / "again.gguf") == sha256(tmp_path / "first.gguf")


def test_export_of_an_earlier_iteration_is_that_checkpoint_byte_for_byte(workspace, default_model, tmp_path, tiny):
    runs = {}
    for iterations, eval_every in ((3, "1"), (1, "100")):  # a longer run, and one that stopped at iteration 1
        run = runs[iterations] = tmp_path / f"run{iterations}"
        result = train(workspace, str(default_model), *tiny[2:], "--iterations", str(iterations), "--eval-every",
                       eval_every, "--run-dir", str(run), "--out", str(tmp_path / f"tuned{iterations}.gguf"))
        assert result.exit_code == 0, result.output

    def export(*args):
        return CliRunner().invoke(cli, ["export", str(runs[3]), *map(str, args)])

    first, recipe = tmp_path / "first.gguf", tmp_path / "first.recipe.json"
    result = export("--iteration", 1, "--out", first, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert f"wrote {first} (iteration 1 of the 3 completed)" in result.output
    assert sha256(first) == sha256(tmp_path / "tuned1.gguf") != sha256(tmp_path / "tuned3.gguf")
    assert json.loads(recipe.read_text())["iteration"] == 1
    assert CliRunner().invoke(cli, ["apply", str(recipe), str(default_model), "--out",
                                    str(tmp_path / "applied.gguf")]).exit_code == 0
    assert sha256(tmp_path / "applied.gguf") == sha256(first)
    assert export("--iteration", 3, "--out", tmp_path / "last.gguf").exit_code == 0
    assert sha256(tmp_path / "last.gguf") == sha256(tmp_path / "tuned3.gguf")  # replayed, not the working copy

    metrics = [json.loads(line) for line in (runs[3] / "metrics.jsonl").read_text().splitlines()]
    heldout = [(m["heldout"]["accuracy"], -m["iteration"]) for m in metrics if "heldout" in m]
    assert len(heldout) == 4
    accuracy, best = max(heldout)  # the highest, the earliest of ties
    result = export("--best", "--out", tmp_path / "best.gguf")
    assert result.exit_code == 0, result.output
    assert f"(iteration {-best} of the 3 completed: the best held-out accuracy, {accuracy:.3f} ± " in result.output
    assert export("--iteration", -best, "--out", tmp_path / "same.gguf").exit_code == 0
    assert sha256(tmp_path / "best.gguf") == sha256(tmp_path / "same.gguf")

    message = one_line_error(export("--iteration", 4, "--out", tmp_path / "none.gguf"))
    assert "has completed 3 iterations; iteration 4 is not one of them" in message
    assert export("--best", "--iteration", 1, "--out", tmp_path / "none.gguf").exit_code == 2
    assert not (tmp_path / "none.gguf").exists()


def test_inspect_lists_trainable_and_frozen_tensors(default_model):
    result = CliRunner().invoke(cli, ["inspect", str(default_model), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["trainable_tensors"] == 210
    frozen = {t["name"]: t["reason"] for t in info["tensors"] if not t["trainable"]}
    assert "token_embd.weight" in frozen and all(frozen.values())
    assert info["trainable_codes"] == 106_168_320  # 30 layers x 7 matrices of SmolLM2-135M


def test_a_q8_0_model_takes_larger_steps_unless_told(model_of_type, default_model, tmp_path):
    # a Q8_0 code step is about a sixteenth of a Q4_1 one in weight terms: the defaults follow the codes
    q8 = model_of_type("Q8_0")
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(q8), "--json"]).output)
    assert info["codes_by_type"] == {"Q8_0": 106_168_320}
    assert (info["sigma"], info["alpha"]) == (0.3, 1.2)
    for model, given, steps in ((q8, [], (0.3, 1.2)), (q8, ["--sigma", "0.01"], (0.01, 1.2)),
                                (default_model, [], (0.005, 0.02))):
        run_dir = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        result = CliRunner().invoke(cli, ["train", str(model), "--iterations", "0", "--heldout", "1", *given,
                                          "--run-dir", str(run_dir), "--out", str(run_dir / "out.gguf")])
        assert result.exit_code == 0, result.output
        recorded = json.loads((run_dir / "state.json").read_text())["settings"]
        assert (recorded["sigma"], recorded["alpha"]) == steps
        assert f"sigma {steps[0]}  alpha {steps[1]}" in result.output
        tuned = GGUFReader(run_dir / "out.gguf")
        assert (tuned.fields["qes.sigma"].contents(), tuned.fields["qes.alpha"].contents()) == pytest.approx(steps)


def test_eval_reports_accuracy_with_standard_error(default_model):
    result = CliRunner().invoke(cli, ["eval", str(default_model), "--task", "arithmetic", "--heldout", "4",
                                      "--json", "--threads", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["n"] == len(report["correct"]) == 4
    assert (report["accuracy"], report["accuracy_se"]) == accuracy_with_stderr(report["correct"])


def test_the_thread_count_does_not_change_the_bytes(workspace, default_model, tmp_path, tiny):
    # llama.cpp splits each matrix product by rows, so every logit is summed in the same order
    # whatever the thread count; the kernels split by 8192-code chunks (tests/test_native.py).
    outputs = []
    for threads in ("1", "2"):
        out = tmp_path / f"threads{threads}.gguf"
        args = [*tiny[:-2], "--threads", threads, "--run-dir", str(tmp_path / threads), "--out", str(out)]
        result = train(workspace, str(default_model), *args)
        assert result.exit_code == 0, result.output
        outputs.append(sha256(out))
    assert outputs[0] == outputs[1]


def test_a_model_with_nothing_to_train_is_refused_with_its_reasons(workspace, frozen_only_model, tmp_path, tiny):
    message = one_line_error(train(workspace, str(frozen_only_model), *tiny, "--run-dir", str(tmp_path / "run"),
                                   "--out", str(tmp_path / "out.gguf")))
    assert "no trainable tensors" in message and "F16" in message
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="native kernels not built")
def test_training_gives_the_same_gguf_with_either_kernel_set(workspace, default_model, tmp_path, monkeypatch, tiny):
    """Two short runs, sidecar residual; tests/test_native.py compares the kernel sets kernel by kernel."""
    digests = {}
    for kernels in ("numba", "native"):
        monkeypatch.setenv(native.ENV, kernels)
        out = tmp_path / f"{kernels}.gguf"
        result = train(workspace, str(default_model), *tiny, "--run-dir", str(tmp_path / kernels), "--out", str(out))
        assert result.exit_code == 0, result.output
        digests[kernels] = sha256(out)
        metrics = [json.loads(line) for line in (tmp_path / kernels / "metrics.jsonl").read_text().splitlines()]
        assert sum(m.get("codes_stepped", 0) for m in metrics) > 0  # codes moved: the update ran for real
    assert digests["numba"] == digests["native"]
