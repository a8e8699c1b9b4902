"""What a user sees of the model's replies: a run with no reward signal stops at once and shows why,
eval --show, the samples in metrics.jsonl and the summary's before/after rows."""

import json


from helpers import invoke, tiny_options
from qes_edge.run import read_metrics

SMALL = tiny_options(heldout=4, max_tokens=None, sigma=None, alpha=None, eval_every=None)


def capitals(tmp_path):
    """The README's {"prompt", "answer"} form."""
    path = tmp_path / "capitals.jsonl"
    cities = ("France Paris, Germany Berlin, Italy Rome, Spain Madrid, Japan Tokyo, China Beijing, Russia Moscow, "
              "Egypt Cairo, Greece Athens, Canada Ottawa, Australia Canberra, Brazil Brasilia, Portugal Lisbon, "
              "Ireland Dublin, Norway Oslo, Sweden Stockholm, Finland Helsinki, Denmark Copenhagen, Poland Warsaw, "
              "Austria Vienna, Hungary Budapest, Kenya Nairobi, Peru Lima, Chile Santiago, Cuba Havana, "
              "Turkey Ankara, India Delhi, Thailand Bangkok, Vietnam Hanoi, Belgium Brussels, Netherlands Amsterdam, "
              "Switzerland Bern, Argentina Aires, Mexico Mexico, Iran Tehran, Iraq Baghdad, Syria Damascus, "
              "Nigeria Abuja, Ghana Accra, Morocco Rabat")  # 40 items: 4 held out, the model gets 3 right
    pairs = [pair.split() for pair in cities.split(", ")]
    path.write_text("".join(json.dumps({"prompt": f"What is the capital of {country}? Reply with the city name only.",
                                        "answer": city}) + "\n" for country, city in pairs))
    return path


def test_a_run_without_signal_stops_with_three_samples_and_force_goes_on(default_model, tmp_path):
    data = capitals(tmp_path)
    # Raw, an instruct model ends its turn at once: every completion is empty, every reward 0
    # (--signal reward: the rewards of generated completions rank the candidates).
    args = [default_model, "--task", data, "--reward", "contains", *SMALL, "--run-dir", tmp_path / "raw"]
    result = invoke("train", *args, "--prompt-format", "raw", "--signal", "reward", "--out", tmp_path / "raw.gguf")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: no reward signal: all 4 held-out rewards and all 4 candidate rewards of "
                                "iteration 1 are 0.000")
    rows = [line for line in lines if line.startswith("     ")]
    assert rows == ["     '' reward 0.000 wrong"] * 3
    assert [line[:5] for line in lines if line.startswith("  ") and not line.startswith("     ")] == \
        ["  1. ", "  2. ", "  3. "]
    assert not (tmp_path / "raw.gguf").exists()
    assert json.loads((tmp_path / "raw" / "state.json").read_text())["iteration"] == 0

    forced = invoke("train", "--resume", tmp_path / "raw", "--force", "--out", tmp_path / "raw.gguf")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "raw.gguf").is_file()

    # By default the answers are reference replies: their likelihood differs between candidates from the first
    # iteration, where no completion earns a reward.
    result = invoke("train", default_model, "--task", data, "--reward", "contains", *SMALL, "--prompt-format", "raw",
                    "--run-dir", tmp_path / "likelihood", "--out", tmp_path / "likelihood.gguf")
    assert result.exit_code == 0, result.output
    first = read_metrics(tmp_path / "likelihood")[1].step
    assert first.rewards_plus != first.rewards_minus and max(first.rewards_plus) < 0  # mean log-probs

    # The same file as chat turns (auto, on this model) gets replies, and the run trains.
    result = invoke("train", default_model, "--task", data, "--reward", "contains", *SMALL,
                    "--run-dir", tmp_path / "auto", "--out", tmp_path / "auto.gguf")
    assert result.exit_code == 0, result.output
    start = read_metrics(tmp_path / "auto")[0].heldout
    assert all(sample.completion for sample in start.samples) and len(set(start.rewards)) > 1


def test_the_builtin_task_on_the_default_model_has_signal(default_model, tmp_path):
    result = invoke("train", default_model, "--task", "arithmetic", *SMALL, "--heldout", "8",
                    "--run-dir", tmp_path / "run", "--out", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output


def test_eval_show_prints_the_scored_items(default_model):
    shown = invoke("eval", default_model, "--heldout", "4", "--show", "3", "--threads", "2")
    report = json.loads(invoke("eval", default_model, "--heldout", "4", "--show", "3", "--threads", "2",
                               "--json").output)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert len(lines) == 1 + 2 * 3 and len(report["samples"]) == 3
    for number, sample in enumerate(report["samples"]):
        question, outcome = lines[1 + 2 * number], lines[2 + 2 * number]
        assert question.startswith(f"  {number + 1}. What is ") and f"(answer '{sample['answer']}')" in question
        verdict = "correct" if sample["correct"] else "wrong"
        assert outcome == f"     {sample['completion']!r} reward {sample['reward']:.3f} {verdict}"
        assert sample["reward"] == report["rewards"][number]
        assert sample["correct"] == bool(report["correct"][number])


def test_heldout_results_keep_samples_and_the_summary_shows_them_before_and_after(workspace, default_model,
                                                                                  tmp_path, tiny):
    reward = f"{workspace / 'rewards_for_tests.py'}:score"
    result = invoke("train", default_model, "--task", workspace / "data.jsonl", "--reward", reward, *tiny,
                    "--run-dir", tmp_path / "run", "--out", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    evals = [m for m in read_metrics(tmp_path / "run") if m.heldout]
    first, last = evals[0].heldout.samples, evals[-1].heldout.samples
    assert len(first) == len(last) == 2 and [s.prompt for s in first] == [s.prompt for s in last]
    lines = result.output.splitlines()
    at = lines.index("held-out items, iteration 0 -> 2:")
    for number, (before, after) in enumerate(zip(first, last)):
        assert lines[at + 2 + 2 * number] == (f"     {before.completion!r} reward {before.reward:.3f} wrong  ->  "
                                              f"{after.completion!r} reward {after.reward:.3f} wrong")
