"""Tasks: generation, splits, rewards, JSONL datasets, user reward functions."""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest

from qes_edge.errors import QesError
from qes_edge.tasks import BUILTIN_TASKS, Item, accuracy_with_stderr, load_task, mean_with_stderr
from qes_edge.tasks.countdown import evaluate
from qes_edge.tasks.jsonl import load_jsonl_task
from qes_edge.tasks.rewards import parse_reward

pytestmark = pytest.mark.unit


def arithmetic_key(item):
    return item.meta["a"], item.meta["op"], item.meta["b"]


def countdown_key(item):
    return tuple(sorted(item.meta["numbers"])), item.meta["target"]


def successor_key(item):
    return item.meta["n"]


# --- built-in generation ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_same_seed_same_items_other_seed_other_items(name):
    first = load_task(name, seed=3, heldout=20, train_size=100)
    again = load_task(name, seed=3, heldout=20, train_size=100)
    other = load_task(name, seed=4, heldout=20, train_size=100)
    assert first.train == again.train and first.heldout == again.heldout
    assert first.train != other.train and first.heldout != other.heldout


@pytest.mark.parametrize("name, key", [("arithmetic", arithmetic_key), ("countdown", countdown_key),
                                       ("successor", successor_key)])
def test_builtin_split_sizes_and_disjoint_questions(name, key):
    task = load_task(name, seed=1, heldout=30, train_size=100)
    assert len(task.heldout) == 30 and len(task.train) == 100
    held, train = {key(i) for i in task.heldout}, {key(i) for i in task.train}
    assert len(held) == 30 and len(train) == 100  # no repeats inside a split
    assert not held & train


def test_builtin_heldout_does_not_depend_on_train_size():
    assert load_task("arithmetic", train_size=10).heldout == load_task("arithmetic").heldout


def test_builtin_default_sizes():
    assert (len(load_task("countdown").train), len(load_task("countdown").heldout)) == (2000, 64)
    arithmetic = load_task("arithmetic")  # every distinct question not held out, up to 2000
    assert len(arithmetic.heldout) == 64 and 50 <= len(arithmetic.train) <= 2000


def test_successor_scores_the_asked_for_form_and_the_number():
    task = load_task("successor", seed=0, heldout=10)
    item = task.heldout[0]
    n = item.meta["n"]
    assert "right after " + str(n) in item.prompt[0]["content"] and item.answer == str(n + 1)
    cases = [(f"The number after {n} is {n + 1}.", 1.0, True), (f" The number after {n} is {n + 1}", 1.0, True),
             (f"The number after {n} is {n}.", 0.1, False), (f"The number after {n + 5} is {n + 1}.", 0.0, False),
             (f"{n + 1}", 0.0, False), ("", 0.0, False)]
    for completion, reward, correct in cases:
        assert (task.reward(completion, item), task.correct(completion, item)) == (reward, correct), completion
    assert len(task.train) == 990 - 10
    with pytest.raises(QesError, match="too few"):
        load_task("successor", heldout=990)


def test_every_countdown_item_is_solvable_by_its_stored_solution():
    task = load_task("countdown", seed=7, heldout=200, train_size=2000)
    for item in task.train + task.heldout:
        value, used = evaluate(item.meta["solution"])
        assert value == item.meta["target"]
        assert sorted(used) == sorted(item.meta["numbers"])
        assert 3 <= len(item.meta["numbers"]) <= 4
        assert item.meta["target"] not in item.meta["numbers"]
        assert task.correct(f"<answer>{item.answer}</answer>", item)


# --- countdown reward -------------------------------------------------------

COUNTDOWN = Item(prompt="", answer="(4 + 5) * 3", meta={"numbers": [4, 5, 3, 7], "target": 27, "solution": "(4 + 5) * 3"})


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>(4 + 5) * 3</answer>", 1.1),
        ("Let me think.\n<answer> 3*(5+4) </answer>", 1.1),
        ("<answer>(7 - 4) * (5 + 4)</answer>", 0.0),  # 4 used twice
        ("<answer>27</answer>", 0.0),  # 27 is not a given number
        ("<answer>(4 + 5) * 3", 1.1),  # closing tag eaten by the stop string
        ("<answer>1 + 1</answer> then <answer>(4 + 5) * 3</answer>", 1.1),  # the last answer counts
        ("<answer>4 + 5 + 3</answer>", 0.1),  # well formed, wrong value
        ("<answer>7 * 4 / 5</answer>", 0.1),  # exact fractions, not 27
        ("(4 + 5) * 3", 0.0),  # no tags
        ("<answer>4 +</answer>", 0.0),
        ("<answer>3 / (5 - 5)</answer>", 0.0),
        ("<answer>-3 + 7 * 4 + 5</answer>", 0.0),  # unary minus invents a number
        ("<answer>3 ** 3</answer>", 0.0),
        ("<answer>4.0 + 5</answer>", 0.0),
        ("<answer>__import__('os').system('echo pwned')</answer>", 0.0),
        ("<answer>(lambda: 27)()</answer>", 0.0),
        ("<answer>[4][0] * 7</answer>", 0.0),
        ("<answer>" + "(" * 150 + "3" + ")" * 150 + "</answer>", 0.0),
    ],
)
def test_countdown_reward(completion, expected):
    task = load_task("countdown", heldout=1, train_size=1)
    assert task.reward(completion, COUNTDOWN) == pytest.approx(expected)
    assert task.correct(completion, COUNTDOWN) == (expected > 1)


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('touch /tmp/qes_pwned')", "open('/etc/passwd').read()", "True + 1", "x", "'a' * 3",
     "1 if 1 else 2", "(1).__class__", "9 ** 9 ** 9", "f'{1}'"],
)
def test_evaluate_rejects_anything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        evaluate(expression)
    assert not Path("/tmp/qes_pwned").exists()


# --- arithmetic reward ------------------------------------------------------

SUM = Item(prompt="", answer="86", meta={"a": 33, "op": "+", "b": 53})


@pytest.fixture(scope="module")
def arithmetic():
    return load_task("arithmetic", heldout=1, train_size=1)


def test_arithmetic_reward_ranks_completions(arithmetic):
    def score(text):
        return arithmetic.reward(text, SUM)

    assert score("The answer is 86.") == score(" The answer is 86\n") == 1.0
    assert score("33 + 53 = 86") == score("86") == score("So it is 86.") == 0.3  # right number, wrong form
    assert 0.1 <= score("The answer is 10.") < score("The answer is 85.") < 0.2
    assert score("The answer is 85.") == score("The answer is 87.")
    assert score("The answer is -400.") == 0.1
    assert score("84 85 86 87") == 0.0  # a list of guesses earns nothing
    assert score("The answer is 86 or 87.") == 0.0
    assert score("I cannot do math.") == 0.0 and score("") == 0.0
    assert arithmetic.correct("The answer is 86.", SUM) and arithmetic.correct("  The answer is 86", SUM)
    assert not arithmetic.correct("86", SUM) and not arithmetic.correct("The answer is 86!", SUM)
    assert not arithmetic.correct("the answer is 86.", SUM) and not arithmetic.correct("The answer is 85.", SUM)


def test_arithmetic_too_few_questions_is_an_error():
    available = len(load_task("arithmetic", heldout=1).train) + 1
    with pytest.raises(QesError, match="distinct questions"):
        load_task("arithmetic", heldout=available)
    with pytest.raises(QesError, match="distinct questions"):
        load_task("arithmetic", heldout=10, train_size=available)


def test_arithmetic_answers_are_right():
    task = load_task("arithmetic", heldout=50)
    for item in task.train + task.heldout:
        a, op, b = item.meta["a"], item.meta["op"], item.meta["b"]
        assert int(item.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert f"{a} {op} {b}" in item.prompt[-1]["content"]


# --- JSONL datasets and generic rewards --------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def qa(n, answer=lambda i: str(i)):
    return [{"prompt": f"question {i}", "answer": answer(i)} for i in range(n)]


@pytest.mark.parametrize(
    "reward, answer, completion, expected",
    [
        ("exact", "Paris", "  Paris\n", True),
        ("exact", "Paris", "Paris.", False),
        ("contains", "Paris", "It is Paris, France", True),
        ("contains", "Paris", "it is paris", False),
        ("regex", r"\bParis\b", "It is Paris.", True),
        ("regex", r"^\d+$", "42 apples", False),
        ("numeric", "1000", "It costs $1,000 in total.", True),
        ("numeric", "3.5", "about 3.5000001 kg", True),
        ("numeric", "3.5", "about 3.51 kg", False),
        ("numeric", "-2", "x = -2", True),
        ("numeric", "42", "7 times 6 is 42", False),  # the first number counts
        ("numeric", "42", "no idea", False),
    ],
)
def test_generic_rewards(tmp_path, reward, answer, completion, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": answer}, {"prompt": "r", "answer": answer}])
    task = load_task(str(path), reward=reward)
    item = task.train[0]
    assert task.correct(completion, item) is expected
    assert task.reward(completion, item) == (1.0 if expected else 0.0)


def test_jsonl_items_keep_prompts_messages_and_meta(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Capital of France?", "answer": "Paris", "source": "geo"},
        "",
        {"messages": messages, "answer": 4},
    ])
    task = load_task(str(path))
    items = sorted(task.train + task.heldout, key=lambda i: i.meta["line"])
    assert items[0] == Item("Capital of France?", "Paris", {"source": "geo", "line": 1}, reply="Paris")
    assert items[1] == Item(messages, "4", {"line": 3}, reply="4")
    assert not task.uses_logprob and task.stop == ()


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "q", "answer": ', "invalid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ('{"prompt": "q"}', "missing 'answer'"),
        ('{"answer": "a"}', "missing 'prompt' or 'messages'"),
        ('{"prompt": 3, "answer": "a"}', "'prompt' must be a string"),
        ('{"prompt": "q", "answer": ["a"]}', "'answer' must be a string"),
        ('{"prompt": "q", "answer": null}', "'answer' must be a string"),
        ('{"messages": [], "answer": "a"}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "hi"}], "answer": "a"}', "role must be one of"),
        ('{"messages": [{"role": "user"}], "answer": "a"}', "string 'content'"),
        ('{"prompt": "q", "messages": [{"role": "user", "content": "q"}], "answer": "a"}', "both"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "a"}, "", bad_line])
    with pytest.raises(QesError) as error:
        load_task(str(path))
    text = str(error.value)
    assert f"{path} line 3" in text and message in text and "\n" not in text


@pytest.mark.parametrize("reward, answer, message", [("regex", "(unclosed", "not a valid regex"), ("numeric", "twelve", "not a number")])
def test_answers_checked_against_the_reward_at_load(tmp_path, reward, answer, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": answer}])
    with pytest.raises(QesError, match=f"line 2: .*{message}"):
        load_task(str(path), reward=reward)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "q", "answer": "a"}\n{"prompt": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(QesError, match="line 2: not UTF-8"):
        load_task(str(path))


def test_empty_and_single_item_datasets_are_errors(tmp_path):
    with pytest.raises(QesError, match="empty"):
        load_task(str(write_jsonl(tmp_path / "empty.jsonl", ["", "  "])))
    with pytest.raises(QesError, match="at least 2"):
        load_task(str(write_jsonl(tmp_path / "one.jsonl", qa(1))))


def test_unknown_task_lists_builtins():
    with pytest.raises(QesError, match="arithmetic, countdown, successor"):
        load_task("no-such-task")


@pytest.mark.parametrize("reward", ["bleu", "exactly", "nomodule_qes_xyz:score", "os:no_such_function", "os:sep", "mod:"])
def test_bad_reward_names(reward):
    with pytest.raises(QesError):
        load_task("arithmetic", reward=reward, heldout=1, train_size=1)


@pytest.mark.parametrize(
    "n, heldout, expected_held",
    [(2, 64, 1), (3, 64, 1), (10, 64, 2), (100, 64, 20), (1000, 64, 64), (1000, 5, 5), (6, 1, 1)],
)
def test_jsonl_split_sizes_disjoint_and_complete(tmp_path, n, heldout, expected_held):
    path = write_jsonl(tmp_path / "d.jsonl", qa(n))
    task = load_task(str(path), heldout=heldout, seed=5)
    assert len(task.heldout) == expected_held and len(task.train) == n - expected_held
    lines = [i.meta["line"] for i in task.train] + [i.meta["line"] for i in task.heldout]
    assert sorted(lines) == list(range(1, n + 1))


def test_jsonl_split_is_seeded_and_train_size_subsamples(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", qa(200)))
    a, b, c = load_task(path, seed=1), load_task(path, seed=1), load_task(path, seed=2)
    assert a.heldout == b.heldout and a.train == b.train
    assert a.heldout != c.heldout
    small = load_task(path, seed=1, train_size=30)
    assert small.heldout == a.heldout
    assert len(small.train) == 30 and all(item in a.train for item in small.train)


def test_logprob_reward(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa(10, answer=lambda i: "x" * (i * 10)))
    task = load_task(str(path), reward="logprob")
    assert task.uses_logprob
    assert task.max_tokens == 94  # longest answer (90 chars) + 4
    with pytest.raises(TypeError):
        task.reward("anything", task.train[0])


# --- user reward functions --------------------------------------------------

USER_REWARDS = '''
import math

def length(completion, item):
    return min(1.0, len(completion) / 10)

def boom(completion, item):
    raise ValueError("cannot score\\nthis")

def nan(completion, item):
    return math.nan

def infinite(completion, item):
    return -math.inf

def text(completion, item):
    return "1.0"

def flag(completion, item):
    return completion == item.answer
'''


MODULE_NUMBERS = itertools.count()


@pytest.fixture
def user_dataset(tmp_path, monkeypatch):
    # A fresh module name per test: Python caches imported modules by name.
    module = f"qes_test_rewards_{next(MODULE_NUMBERS)}"
    (tmp_path / f"{module}.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    write_jsonl(tmp_path / "data.jsonl", qa(20))
    return module


def test_user_reward_imported_from_cwd(user_dataset):
    task = load_task("data.jsonl", reward=f"{user_dataset}:length")
    item = task.train[0]
    assert task.reward("hello", item) == 0.5
    assert task.correct("hello world", item) and not task.correct("hi", item)


def test_user_reward_from_file_path(user_dataset):
    task = load_task("data.jsonl", reward=f"{user_dataset}.py:flag")
    item = task.heldout[0]
    assert task.reward(item.answer, item) == 1.0 and task.reward("nope", item) == 0.0


@pytest.mark.parametrize("function, message", [
    ("boom", "raised ValueError: cannot score"),
    ("nan", "returned nan"),
    ("infinite", "returned -inf"),
    ("text", "returned str '1.0', not a number"),
])
def test_user_reward_failures_name_the_item(user_dataset, function, message):
    # load_task checks each answer as a reference reply, so a failing function fails there, naming the item.
    with pytest.raises(QesError) as error:
        load_task("data.jsonl", reward=f"{user_dataset}:{function}")
    assert message in str(error.value) and "train item 0 (data.jsonl line " in str(error.value)
    task = load_jsonl_task(Path("data.jsonl"), parse_reward(f"{user_dataset}:{function}"), 0, 64, None)
    item = task.train[3]
    with pytest.raises(QesError) as error:
        task.reward("x", item)
    text = str(error.value)
    assert message in text
    assert f"train item 3 (data.jsonl line {item.meta['line']})" in text
    assert "\n" not in text
    with pytest.raises(QesError, match="held-out item 0"):
        task.correct("x", task.heldout[0])


def test_user_reward_works_on_builtin_tasks(user_dataset):
    task = load_task("arithmetic", reward=f"{user_dataset}:flag", heldout=2, train_size=2)
    item = task.train[0]
    assert task.reward(item.answer, item) == 1.0


def test_user_reward_missing_function(user_dataset):
    with pytest.raises(QesError, match="has no function 'missing'"):
        load_task("data.jsonl", reward=f"{user_dataset}:missing")


# --- statistics -------------------------------------------------------------


def test_accuracy_and_mean_with_stderr():
    assert accuracy_with_stderr([True, True, False, False]) == (0.5, 0.25)
    assert accuracy_with_stderr([True] * 5) == (1.0, 0.0)
    mean, stderr = mean_with_stderr([1.0, 2.0, 3.0])
    assert mean == 2.0 and stderr == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(mean_with_stderr([4.0])[1])
    with pytest.raises(ValueError):
        accuracy_with_stderr([])
