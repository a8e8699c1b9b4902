"""A fine-tune as a recipe: export --recipe writes it, apply rebuilds the tuned GGUF from it bit for bit,
and refuses another base or a damaged recipe, writing nothing."""

import json

import pytest

from helpers import invoke, one_line_error, sha256
from qes_edge.errors import QesError
from qes_edge.kernels import SCHEME
from qes_edge.recipe import FORMAT, read_recipe


def test_apply_rebuilds_the_tuned_gguf_bit_for_bit(workspace, default_model, base_model, tmp_model_copy, tiny,
                                                   tmp_path):
    reward = f"{workspace / 'rewards_for_tests.py'}:score"
    trained = invoke("train", default_model, "--task", workspace / "data.jsonl", "--reward", reward, *tiny,
                     "--heldout", "4", "--run-dir", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    tuned, recipe = tmp_path / "tuned.gguf", tmp_path / "tuned.recipe.json"
    exported = invoke("export", tmp_path / "run", "--out", tuned, "--recipe", recipe)
    assert exported.exit_code == 0, exported.output
    assert f"wrote {recipe}: {recipe.stat().st_size:,} bytes (the GGUF: {tuned.stat().st_size:,})" in exported.output
    assert recipe.stat().st_size < 2000 and sha256(tuned) != sha256(default_model)  # codes moved

    content = json.loads(recipe.read_text())
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (content["format"], content["scheme"], content["base_sha256"]) == (FORMAT, SCHEME, sha256(default_model))
    assert content["history"] == state["history"] and content["iteration"] == 2
    assert {"sigma", "alpha", "decay", "seed", "residual", "window", "population"} <= set(content["settings"])
    assert "threads" not in content["settings"]  # it does not change the result

    base_before = sha256(default_model)
    rebuilt = tmp_path / "rebuilt.gguf"
    applied = invoke("apply", recipe, default_model, "--out", rebuilt)
    assert applied.exit_code == 0, applied.output
    assert sha256(rebuilt) == sha256(tuned)
    assert sha256(default_model) == base_before

    # another base: one line with both hashes, nothing written
    message = one_line_error(invoke("apply", recipe, base_model, "--out", tmp_path / "other.gguf"))
    assert sha256(base_model) in message and sha256(default_model) in message
    assert not (tmp_path / "other.gguf").exists()

    # a seed changed: valid JSON, but the rebuild is not the recipe's model
    damaged = tmp_path / "damaged.recipe.json"
    content["history"][0][0][0] += 1
    damaged.write_text(json.dumps(content))
    message = one_line_error(invoke("apply", damaged, default_model, "--out", tmp_path / "damaged.gguf"))
    assert "damaged" in message and "nothing written" in message
    assert not (tmp_path / "damaged.gguf").exists() and not list(tmp_path.glob("damaged.gguf*"))

    # cut short
    damaged.write_bytes(recipe.read_bytes()[:100])
    message = one_line_error(invoke("apply", damaged, default_model, "--out", tmp_path / "damaged.gguf"))
    assert message.startswith(f"Error: {damaged} is not a usable qes-edge recipe: unreadable")
    # the output may not be the base
    message = one_line_error(invoke("apply", recipe, tmp_model_copy, "--out", tmp_model_copy))
    assert "refusing to write over the base model" in message and sha256(tmp_model_copy) == base_before


GOOD = {"format": FORMAT, "qes_edge": "0.1.0", "scheme": SCHEME, "base_file": "m.gguf", "base_sha256": "a" * 64,
        "tuned_sha256": "b" * 64, "settings": {"sigma": 0.005, "population": 4}, "iteration": 1,
        "history": [[[11, 22], [-3, 4]]]}


@pytest.mark.unit
@pytest.mark.parametrize("change, problem", [
    ({"format": "something else"}, "its format is not"),
    ({"history": None}, "'history' is missing or not a list"),
    ({"tuned_sha256": "c0ffee"}, "'tuned_sha256' is not a sha256"),
    ({"settings": {"sigma": -1}}, "its settings are wrong (--sigma must be in (0, 4]"),
    ({"settings": {"colour": "red"}}, "its settings are wrong"),
    ({"iteration": 2}, "'iteration' is 2 but the history has 1 rows"),
    ({"history": [[[11], [-3, 4]]]}, "iteration 1 is not 2 seeds and 2 integer weights"),
    ({"history": [[[11, 22], [-3, 4.5]]]}, "iteration 1 is not 2 seeds and 2 integer weights"),
    ({"history": [[[11, 1 << 64], [-3, 4]]]}, "iteration 1 is not 2 seeds and 2 integer weights"),
])
def test_a_damaged_recipe_is_refused_before_any_work(tmp_path, change, problem):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(GOOD))
    assert read_recipe(path) == GOOD
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(QesError) as caught:
        read_recipe(path)
    assert str(caught.value).startswith(f"{path} is not a usable qes-edge recipe: {problem}")
