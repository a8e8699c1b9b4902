"""--prompt-format: how items reach a model with a chat template, and one without (a base model)."""

import json

import pytest

from helpers import invoke, tiny_options
from qes_edge.errors import QesError
from qes_edge.tasks import Item, Task, load_task
from qes_edge.tasks.prompt_format import NEXT_QUESTION, PromptFormat, transcript
from qes_edge.tasks.rewards import Exact

CHAT, RAW = PromptFormat(chat=True), PromptFormat(chat=False)


def task_of(*prompts) -> Task:
    items = [Item(prompt=p, answer="a") for p in prompts]
    return Task(name="t", train=items, heldout=items, max_tokens=4, stop=("\n",), rule=Exact())


@pytest.mark.unit
@pytest.mark.parametrize("setting, has_template, chat", [
    ("auto", True, True), ("auto", False, False), ("chat", True, True), ("raw", True, False), ("raw", False, False),
])
def test_auto_is_chat_exactly_when_the_model_has_a_template(setting, has_template, chat):
    assert PromptFormat.choose(setting, "model.gguf", has_template).chat is chat


@pytest.mark.unit
def test_chat_on_a_model_without_a_template_names_the_users_file():
    with pytest.raises(QesError, match=r"^base\.gguf has no chat template: use --prompt-format raw"):
        PromptFormat.choose("chat", "base.gguf", False)


@pytest.mark.unit
def test_a_string_prompt_is_a_user_turn_in_chat_and_itself_in_raw():
    task = task_of("What is 2 + 2?")
    item = task.train[0]
    assert CHAT.prompt(task, item) == [{"role": "user", "content": "What is 2 + 2?"}]
    assert RAW.prompt(task, item) == "What is 2 + 2?"
    assert RAW.stop(task) == CHAT.stop(task) == ("\n",)  # plain text is continued as it is


@pytest.mark.unit
def test_chat_items_in_raw_become_a_transcript_that_stops_at_the_next_question():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2 + 2?"}]
    task = task_of(messages)
    assert RAW.prompt(task, task.train[0]) == "Be brief.\n\nQ: Hi\nA: Hello\n\nQ: 2 + 2?\nA:"
    assert RAW.stop(task) == ("\n", NEXT_QUESTION)
    assert CHAT.prompt(task, task.train[0]) == messages
    assert task.train[0].question == "2 + 2?"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_builtin_tasks_have_a_few_shot_plain_form(name):
    task = load_task(name, heldout=4, train_size=4)
    assert len(task.examples) >= 2
    for item in task.heldout:
        text = RAW.prompt(task, item)
        assert text == transcript(task.examples, item.prompt)
        assert text.startswith(f"Q: {task.examples[0][0]}\nA: {task.examples[0][1]}\n\n")
        assert text.endswith(f"Q: {item.question}\nA:")
    # the worked examples are not questions the task asks
    asked = {item.question for item in task.train + task.heldout}
    assert not asked & {question for question, _ in task.examples}


# ---- on the real model ------------------------------------------------------------------------------

def test_a_base_model_is_scored_on_the_few_shot_form(base_model):
    result = invoke("eval", base_model, "--heldout", "8", "--threads", "2", "--show", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["accuracy"] > 0  # it continues "A: The answer is N." (0.375 at n=32 when measured)
    assert [s["completion"].startswith(" The answer is") for s in report["samples"]] == [True] * 3

    refused = invoke("eval", base_model, "--prompt-format", "chat", "--heldout", "2")
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines()[-1] == \
        "Error: base.gguf has no chat template: use --prompt-format raw (or auto)"


def test_training_a_base_model_names_its_file_not_the_working_copy(base_model, tmp_path):
    args = tiny_options(iterations=1, heldout=4, max_tokens=None, sigma=None, alpha=None, eval_every=None)
    result = invoke("train", base_model, *args, "--run-dir", tmp_path / "ok", "--out", tmp_path / "ok.gguf")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ok.gguf").is_file()

    result = invoke("train", base_model, *args, "--prompt-format", "chat", "--run-dir", tmp_path / "chat")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: base.gguf has no chat template") and "live" not in line
