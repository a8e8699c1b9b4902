"""Settings, the single source: CLI options, checks, the resume comparison and the provenance follow its fields.

The resume tests run `qes-edge train --resume` on a run made on a small
synthetic GGUF: what --resume checks comes before any model is loaded.
"""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from qes_edge import settings
from qes_edge.cli import cli
from qes_edge.errors import QesError
from qes_edge.run import Run
from qes_edge.settings import Settings

pytestmark = pytest.mark.unit

RUN = Settings(sigma=0.01, alpha=0.05, shaping="zscore", residual="replay", window=3, iterations=4)


def another_value(name: str):
    """A valid value of the setting that is not RUN's."""
    value, kind, check = getattr(RUN, name), settings.value_type(name), settings.about(name).check
    if kind is bool:
        return not value
    if choices := getattr(check, "choices", None):
        return next(c for c in choices if c != value)
    if kind is str:
        return f"{value}-other"
    return (value or 1) * 2 if kind is int else value / 2


@pytest.fixture
def run_dir(frozen_only_model, tmp_path):
    Run.create(tmp_path / "run", frozen_only_model, dataclasses.replace(RUN))
    return tmp_path / "run"


def resume(run_dir, *args, config: str | None = None):
    if config is not None:
        (run_dir.parent / "resume.toml").write_text(config)
        args = (*args, "--config", str(run_dir.parent / "resume.toml"))
    return CliRunner().invoke(cli, ["train", "--resume", str(run_dir), *args])


def refusal(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


# ---- on --resume, a setting that would change the result is refused, however it is given ----------

@pytest.mark.parametrize("args, option", [
    (["--sigma", "0.02"], "--sigma"),
    (["--residual", "sidecar"], "--residual"),
    (["--no-error-feedback"], "--no-error-feedback"),
    (["--train-embeddings"], "--train-embeddings"),
    (["--max-tokens", "7"], "--max-tokens"),
])
def test_resume_refuses_an_option_that_changes_the_result(run_dir, args, option):
    state = run_dir.joinpath("state.json").read_bytes()
    assert refusal(resume(run_dir, *args)).startswith(f"Error: {option} differs from the run's (")
    assert run_dir.joinpath("state.json").read_bytes() == state


@pytest.mark.parametrize("config, option", [
    ("sigma = 0.02", "--sigma"),
    ("no-error-feedback = true", "--no-error-feedback"),
    ("no_error_feedback = true", "--no-error-feedback"),
    ("shaping = 'rank'", "--shaping"),
    ("eval-every = 2\nwindow = 9", "--window"),
])
def test_resume_refuses_a_config_setting_that_changes_the_result(run_dir, config, option):
    assert refusal(resume(run_dir, config=config)).startswith(f"Error: {option} differs from the run's (")


def test_the_command_line_wins_over_the_config_on_resume_too(run_dir):
    assert "--sigma" in refusal(resume(run_dir, "--sigma", "0.02", config="sigma = 0.01"))
    result = resume(run_dir, "--sigma", "0.01", config="sigma = 0.02")
    assert "differs" not in result.output


def test_resume_takes_the_runs_own_values_and_the_free_settings(run_dir):
    # Not refused: the run goes on to load its model, which (synthetic) has nothing to train.
    result = resume(run_dir, "--sigma", "0.01", "--shaping", "zscore", "--threads", "1",
                    config="iterations = 7\neval-every = 2")
    assert result.exit_code == 1 and "differs" not in result.output
    assert "iteration 0/7" in result.output and "no trainable tensors" in result.output


def test_every_result_setting_is_compared_and_every_free_one_is_taken():
    for name in settings.names():
        given = {name: another_value(name)}
        if settings.about(name).free_on_resume:
            assert getattr(RUN.resumed_with(given), name) == given[name]
        else:
            with pytest.raises(QesError, match=f"^{settings.option(name)} differs from the run's"):
                RUN.resumed_with(given)


# ---- options, checks and provenance come from the fields ---------------------------------------------

def test_every_setting_is_an_option_of_train_with_its_help_and_default():
    options = {p.name: p for p in next(c for n, c in cli.commands.items() if n == "train").params}
    for name in settings.names():
        option = options[name]
        assert option.opts == [settings.option(name)]
        assert option.help == settings.about(name).help and option.default == settings.default(name)


def test_each_check_names_its_option():
    cases = {"population": 3, "iterations": -1, "batch": 0, "sigma": 0.0, "alpha": -0.1, "decay": 1.5,
             "residual": "disk", "shaping": "best", "max_tokens": 0, "window": -1, "heldout": 0, "eval_every": 0}
    for name, value in cases.items():
        with pytest.raises(QesError, match=f"^{settings.option(name)} must .*, got {value}$"):
            dataclasses.replace(RUN, **{name: value}).check()
    with pytest.raises(QesError, match="--batch 2"):
        Settings(shaping="tscore", batch=1).check()
    Settings(shaping="zscore", batch=1).check()


def test_a_bad_value_is_one_line_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "absent.gguf"), "--decay", "2"])
    assert refusal(result) == f"Error: model file not found: {tmp_path / 'absent.gguf'}"
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "model.gguf"), "--decay", "2",
                                      "--run-dir", str(tmp_path / "run")])
    assert refusal(result) == "Error: --decay must be in [0, 1], got 2.0"
    assert not (tmp_path / "run").exists()


def test_provenance_records_the_recorded_settings_in_field_order():
    recorded = [n for n in settings.names() if settings.about(n).recorded]
    assert list(Settings().provenance()) == recorded
    assert Settings().provenance()["reward"] == ""  # GGUF metadata has no null
    assert Settings(error_feedback=False).provenance()["residual"] == "none"


def test_the_run_records_what_it_completed(run_dir):
    run = Run.load(run_dir)
    run.iteration = 2
    provenance = run.provenance()
    assert list(provenance)[:3] == ["version", "base_sha256", "base_file"] and list(provenance)[-1] == "scheme"
    assert provenance["iterations"] == 2 and provenance["sigma"] == 0.01 and provenance["residual"] == "replay"


def test_state_json_holds_every_setting_and_reads_back(run_dir):
    state = json.loads(run_dir.joinpath("state.json").read_text())
    assert state["settings"] == dataclasses.asdict(RUN)
    assert Run.load(run_dir).settings == RUN


def test_steps_not_given_follow_the_type_holding_most_codes():
    four_bit = Settings().for_codes({"Q4_1": 8})
    assert (four_bit.sigma, four_bit.alpha) == (0.005, 0.02)
    mixed = Settings().for_codes({"Q4_K": 5, "Q8_0": 9, "Q6_K": 2})
    assert (mixed.sigma, mixed.alpha) == (0.3, 1.2)
    assert Settings().for_codes({"Q4_K": 9, "Q8_0": 5}).sigma == 0.005
    assert Settings().for_codes({}).alpha == 0.02  # nothing trainable: the 4-bit defaults
    given = Settings(sigma=0.01).for_codes({"Q8_0": 1})
    assert (given.sigma, given.alpha) == (0.01, 1.2)
    assert Settings(alpha=0.5).for_codes({"Q8_0": 1}).alpha == 0.5
