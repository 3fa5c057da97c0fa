"""Tasks behind one interface: addition as before, Countdown, JSONL files and reward files (no model)."""
import hashlib
import json

import pytest

from shared.runtime.errors import UsageError, UserError
from shared.tasks.addition.task import AdditionTask
from shared.tasks.countdown import (CountdownTask, evaluate_expression, generate_countdown, is_held_out, reachable, solve)
from shared.tasks.file_task import FileTask, answers_match
from shared.tasks.registry import load_task, task_config
from shared.tasks.task import RewardFailed, TaskConfig, reward_components, reward_weights
from shared.training.config import build_run_config


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def test_addition_behind_the_interface_is_the_seed_task_unchanged():
    """The problems, split, SFT targets and weights the runs before the task interface used (hashes taken then)."""
    task = load_task(TaskConfig())
    assert isinstance(task, AdditionTask)
    assert digest([p.operands for p in task.training_problems(1000, 42, for_sft=True)]) == "de800fb9c61506b1"
    assert digest([p.operands for p in task.training_problems(96, 43, for_sft=False)]) == "7ea4681eee063244"
    assert digest([p.operands for p in task.held_out(1000, 42)]) == "a88f844047778d45"
    sft = task.training_problems(1000, 42, for_sft=True)
    assert hashlib.sha256("".join(p.completion for p in sft).encode()).hexdigest()[:16] == "0bbe7e6180ae0cc6"
    assert reward_weights(task.rewards) == {"correctness": 1.0, "format": 0.2, "steps": 0.1, "verification": 0.1,
                                    "step_validity": 0.2}
    config = build_run_config({"model": {"name": "smollm2"}}, {})
    assert config.task == TaskConfig("addition") and config.grpo.reward_weights == reward_weights(task.rewards)


def test_countdown_traces_solve_their_problems_and_earn_every_reward():
    task = CountdownTask()
    problems = task.training_problems(200, 0, for_sft=True)
    assert len({p.prompt for p in problems}) == 200 and {len(p.numbers) for p in problems} == {3, 4}
    for problem in problems:
        assert problem.target not in problem.numbers and 1 <= problem.target <= 100
        assert reward_components(task.rewards, problem.completion, problem) == {
            "correctness": 1.0, "format": 1.0, "valid_expression": 1.0, "numbers_once": 1.0}
    assert problems == task.training_problems(200, 0, for_sft=True)  # seeded


def test_countdown_split_holds_out_sets_of_numbers():
    held_out = generate_countdown(300, 0, held_out=True)
    training = generate_countdown(3000, 0, held_out=False)
    assert all(is_held_out(p.numbers) for p in held_out) and not any(is_held_out(p.numbers) for p in training)
    assert not {tuple(sorted(p.numbers)) for p in held_out} & {tuple(sorted(p.numbers)) for p in training}


def test_countdown_solver_and_rewards():
    steps, expression = solve((3, 5, 7, 2), 24)
    assert evaluate_expression(expression)[0] == 24 and sorted(evaluate_expression(expression)[1]) == [2, 3, 5, 7]
    assert solve((1, 1, 1), 50) is None and 6 in reachable((1, 2, 3))
    task = CountdownTask()
    problem = task.typed_problem("3 5 7 2 24")
    assert problem.numbers == (3, 5, 7, 2) and problem.target == 24 and problem.completion is None

    def scores(answer):
        return reward_components(task.rewards, f"<think>\ntrying\n</think>\n{answer}", problem)

    assert scores("(7 - 5 + 2) * 3 * 1") == {"correctness": 0.0, "format": 1.0, "valid_expression": 1.0,
                                             "numbers_once": 0.0}  # a number that is not given
    assert scores("(7 + 5) * 2 * 3")["correctness"] == 0.0 and scores("(7 + 5) * 2 * 3")["numbers_once"] == 1.0
    assert scores("(7 - 5 + 2) * 3 * 2 / 2 = 24")["numbers_once"] == 0.0
    assert scores("3 * (7 + 5) - 2 * 1")["valid_expression"] == 1.0
    assert scores("(5 + 7) * 2 * (3 - 2 + 0)")["numbers_once"] == 0.0
    assert scores("3 * 5 + 7 + 2 = 24")["correctness"] == 1.0  # "expression = target" is the expression


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "2 ** 10", "1 / 0", "-3 + 27", "x + 1",
                                  "(" * 300 + "1" + ")" * 300, "3.5 + 1", "", "1_000 + 1", "4 // 2"])
def test_countdown_evaluator_takes_only_arithmetic_of_whole_numbers(text):
    assert evaluate_expression(text) is None


def write_lines(path, *lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_a_jsonl_task_splits_counts_and_judges_answers(tmp_path):
    lines = [{"prompt": f"Double {n}", "answer": 2 * n, "completion": f"<think>\n{n} * 2\n</think>\n{2 * n}",
              "split": "train"} for n in range(30)]
    lines += [{"prompt": f"Halve {n}", "answer": n / 2, "split": "train"} for n in range(10)]  # GRPO only
    lines += [{"prompt": f"Triple {n}", "answer": str(3 * n), "split": "test"} for n in range(5)]
    lines += [{"prompt": f"Name {n}", "answer": f"n{n}", "split": "names"} for n in range(3)]
    task = FileTask(str(write_lines(tmp_path / "t.jsonl", *lines)))
    assert len(task.training_problems(100, 0, for_sft=True)) == 30
    assert len(task.training_problems(100, 0, for_sft=False)) == 40
    assert [p.prompt for p in task.held_out(100, 0)] == [f"Triple {n}" for n in range(5)]
    assert task.extra_sets == ("names",) and len(task.extra_set("names", 2, 0)) == 2
    with pytest.raises(UsageError, match=r"--num-samples 31 is more than .*t.jsonl has: 30 training lines with a"):
        task.check_count("--num-samples", 31, "sft")
    task.check_count("--eval-samples", 10_000, "held_out")  # evaluations take what the file has
    halve = task.training_problems(40, 0, for_sft=False)
    example = next(p for p in halve if p.prompt == "Halve 3")
    assert example.fields() == {"prompt": "Halve 3", "answer": 1.5, "split": "train"} and example.line == 34
    assert reward_components(task.rewards, "<think>\nhalf\n</think>\n1.50", example) == {"correctness": 1.0,
                                                                                        "format": 1.0}
    assert reward_components(task.rewards, "1.5", example) == {"correctness": 0.0, "format": 0.0}
    assert answers_match(" n2 ", "n2") and not answers_match("N2", "n2") and answers_match("42", 42.0)


def test_lines_without_a_split_hold_out_one_in_twenty_by_prompt(tmp_path):
    lines = [{"prompt": f"Say {n}", "answer": n} for n in range(400)]
    task = FileTask(str(write_lines(tmp_path / "t.jsonl", *lines)))
    held_out = len(task.held_out(1000, 0))
    assert 8 <= held_out <= 35 and held_out + len(task.training_problems(1000, 0, for_sft=False)) == 400
    again = FileTask(str(write_lines(tmp_path / "u.jsonl", *reversed(lines))))
    assert {p.prompt for p in again.held_out(1000, 0)} == {p.prompt for p in task.held_out(1000, 0)}


def test_a_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    lines = [{"prompt": f"Say {n}", "answer": n} for n in range(60)]
    plain = write_lines(tmp_path / "plain.jsonl", *lines)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert [p.prompt for p in FileTask(str(marked)).held_out(100, 0)] == \
        [p.prompt for p in FileTask(str(plain)).held_out(100, 0)]
    assert FileTask(str(marked)).training_problems(1, 0, for_sft=False)[0].line >= 1


@pytest.mark.parametrize("content, message", [
    ("", r"is empty: it needs one JSON object per line"),
    ('{"prompt": "a", "answer": 1, "split": "train"}\n{"prompt": "b", "answer": 2\n',
     r"line 2 is not JSON \(Expecting ',' delimiter"),
    ('{"prompt": "a", "answer": 1, "split": "test"}\n{"answer": 2}\n', r"line 2 has no 'prompt'"),
    ('{"prompt": "a", "split": "train"}\n', r"line 1 has no 'answer'"),
    ('[1, 2]\n', r"line 1 is not a JSON object"),
    ('{"prompt": "a", "answer": [1]}\n', r"line 1: 'answer' must be a string or number"),
    ('{"prompt": "a", "answer": 1, "completion": 5}\n', r"line 1: 'completion' must be a string"),
    ('{"prompt": "a", "answer": 1, "split": "test"}\n', r"has no training lines"),
    ('{"prompt": "a", "answer": 1, "split": "train"}\n', r"has no held-out lines"),
])
def test_bad_task_files_name_the_line_and_the_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        FileTask(str(path))


def test_a_missing_task_file_or_an_unknown_name(tmp_path):
    with pytest.raises(UsageError, match=r"--task nope: no such file; expected a built-in task \(addition, countdown"):
        task_config("nope")


def write_rewards(tmp_path, body: str):
    return write_lines(tmp_path / "rewards.py", body)


def test_a_reward_file_adds_rewards_that_see_the_example(tmp_path):
    rewards = write_rewards(tmp_path, "def short(completion, example):\n"
                                      "    shorter = len(example['prompt']) - len(example['operands'])\n"
                                      "    return float(len(completion) < shorter)\n"
                                      "def correctness(completion, example):\n    return 0.5\n"
                                      "REWARDS = {'short': (short, 0.3), 'correctness': (correctness, 2)}\n")
    task = load_task(task_config("addition", rewards))
    assert reward_weights(task.rewards) == {"correctness": 2.0, "format": 0.2, "steps": 0.1, "verification": 0.1,
                                    "step_validity": 0.2, "short": 0.3}
    problem = task.typed_problem("1 + 2 + 3")
    components = reward_components(task.rewards, "<think>\n1\n</think>\n6", problem)
    assert components["short"] == 0.0 and components["correctness"] == 0.5  # a built-in name is replaced


@pytest.mark.parametrize("body, message", [
    ("def f(:\n", r"does not import: SyntaxError: .* \(line 1\)"),
    ("import os\nx = undefined_name\n", r"does not import: NameError: name 'undefined_name' is not defined \(line 2\)"),
    ("import sys\nsys.exit(3)\n", r"does not import: SystemExit: 3"),
    ("rewards = {}\n", r"defines no REWARDS: it needs REWARDS = \{\"name\": \(function, weight\)\}"),
    ("REWARDS = {'a': len}\n", r"REWARDS\['a'\] must be \(function, weight\)"),
    ("REWARDS = {'a': (len, 'high')}\n", r"REWARDS\['a'\] must be \(function, weight\)"),
    ("REWARDS = {'a': (3, 1.0)}\n", r"REWARDS\['a'\] must be \(function, weight\)"),
])
def test_bad_reward_files_are_one_line(tmp_path, body, message):
    with pytest.raises(UsageError, match=message):
        load_task(task_config("addition", write_rewards(tmp_path, body)))


def test_a_reward_that_raises_or_returns_no_number_names_itself_and_the_line(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", {"prompt": "a", "answer": 1, "split": "train"},
                       {"prompt": "b", "answer": 2, "split": "test"})
    rewards = write_rewards(tmp_path, "def boom(completion, example):\n    return 1 / 0\n"
                                      "def text(completion, example):\n    return 'high'\n"
                                      "def numpy_ok(completion, example):\n    import numpy\n"
                                      "    return numpy.float32(0.5)\n"
                                      "REWARDS = {'boom': (boom, 1), 'text': (text, 1), 'numpy_ok': (numpy_ok, 1)}\n")
    task = load_task(task_config(str(path), rewards))
    example = task.held_out(1, 0)[0]
    with pytest.raises(RewardFailed, match=r"reward 'boom' raised ZeroDivisionError: division by zero on line 2 of "):
        reward_components(task.rewards, "2", example)
    del task.rewards["boom"]
    with pytest.raises(RewardFailed, match=r"reward 'text' returned 'high', not a finite number, on line 2 of "):
        reward_components(task.rewards, "2", example)
    del task.rewards["text"]
    assert reward_components(task.rewards, "2", example)["numpy_ok"] == 0.5


def test_typed_problems_per_task():
    assert CountdownTask().typed_problem("Use 3, 5 and 7 to make 26").numbers == (3, 5, 7)
    with pytest.raises(UserError, match="type 2 to 6 numbers, then the target"):
        CountdownTask().typed_problem("24")
    assert AdditionTask().typed_problem("Calculate 1 + 2").answer == 3


def test_eval_and_infer_take_the_checkpoints_task_or_say_it_is_gone(tmp_path):
    from shared.tasks.registry import checkpoint_task

    assert checkpoint_task(tmp_path, None, None).name == "addition"  # a checkpoint from before tasks
    task_file = write_lines(tmp_path / "t.jsonl", {"prompt": "a", "answer": 1, "split": "train"},
                            {"prompt": "b", "answer": 2, "split": "test"})
    (tmp_path / "run_config.json").write_text(json.dumps({"task": {"name": str(task_file)}}))
    assert checkpoint_task(tmp_path, None, None).name == str(task_file)
    assert checkpoint_task(tmp_path, "countdown", None).name == "countdown"
    task_file.unlink()
    with pytest.raises(UsageError, match=rf"was trained with {task_file}, which is not there any more: give --task"):
        checkpoint_task(tmp_path, None, None)
