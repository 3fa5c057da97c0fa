import pytest

from shared.tasks.addition.data import Problem, reasoning_target
from shared.tasks.addition.rewards import (ADDITION_REWARDS, correctness_reward, format_reward, parse_answer, step_validity_reward,
                                           steps_reward, verification_reward)
from shared.tasks.addition.task import AdditionTask
from shared.tasks.task import combined_reward, reward_components, reward_weights

WEIGHTS = reward_weights(AdditionTask().rewards)

PROBLEM = Problem((23, 15, 8))
PERFECT = reasoning_target(PROBLEM)


def test_perfect_completion_earns_every_reward():
    components = reward_components(ADDITION_REWARDS, PERFECT, PROBLEM)
    assert components == {"correctness": 1.0, "format": 1.0, "steps": 1.0, "verification": 1.0,
                          "step_validity": 1.0}
    assert combined_reward(components, WEIGHTS) == pytest.approx(1.6)


def test_correctness_is_weighted_highest():
    assert WEIGHTS["correctness"] > max(weight for name, weight in WEIGHTS.items() if name != "correctness")


def test_right_format_wrong_arithmetic_earns_no_validity_or_correctness():
    hacked = PERFECT.replace("23 + 15 = 38", "23 + 15 = 40").replace("38 + 8 = 46", "40 + 8 = 48")
    hacked = hacked.replace("is indeed 46", "is indeed 48").replace("</think>\n46", "</think>\n48")
    components = reward_components(ADDITION_REWARDS, hacked, PROBLEM)
    assert components["format"] == 1.0 and components["steps"] == 1.0
    assert components["correctness"] == 0.0
    assert components["step_validity"] == pytest.approx(0.5)  # 40 + 8 = 48 is right, 23 + 15 = 40 is not
    assert components["verification"] == 0.0


def test_all_wrong_steps_earn_nothing_for_validity():
    text = "<think>\n1. Adding the first two: 23 + 15 = 99\n2. Adding the third: 99 + 8 = 5\n</think>\n46"
    assert step_validity_reward(text, PROBLEM) == 0.0
    assert correctness_reward(text, PROBLEM) == 1.0


def test_skipping_the_work_earns_no_step_rewards():
    text = "<think>\n</think>\n46"
    assert step_validity_reward(text, PROBLEM) == 0.0
    assert steps_reward(text, PROBLEM) == 0.0
    assert verification_reward(text, PROBLEM) == 0.0


def test_repeating_one_right_equation_earns_partial_validity_only():
    text = "<think>\n" + "1. Adding the first two: 23 + 15 = 38\n" + "</think>\n46"
    assert step_validity_reward(text, PROBLEM) == pytest.approx(0.5)


def test_missing_answer():
    text = PERFECT.rsplit("\n", 1)[0] + "\n"
    assert parse_answer(text) is None
    assert correctness_reward(text, PROBLEM) == 0.0
    assert format_reward(text, PROBLEM) == 0.0


def test_two_answers_are_not_an_answer():
    assert parse_answer(PERFECT + " 46") is None
    assert parse_answer(PERFECT + "\n47") is None
    assert correctness_reward(PERFECT + "\n46", PROBLEM) == 0.0


@pytest.mark.parametrize("text", ["", "46", "<think>", "</think>", "</think>\nforty-six", "</think>\n4 6",
                                  "</think>\n46.5", "\x00\xff</think>\n\n", "</think>\n" + "9" * 5000 + "x"])
def test_parse_answer_survives_junk(text):
    assert parse_answer(text) is None


def test_parse_answer_reads_the_last_think_block():
    assert parse_answer("<think>\nx\n</think>\n12\n</think>\n 46 ") == 46


def test_format_rejects_nested_or_missing_tags():
    assert format_reward("I think 46", PROBLEM) == 0.0
    assert format_reward("<think>\n<think>\nx\n</think>\n46", PROBLEM) == 0.0
    assert format_reward("<think>\nx</think>\n46", PROBLEM) == 0.0


def test_steps_must_be_numbered_in_order():
    out_of_order = PERFECT.replace("1. Adding", "2. Adding", 1)
    assert steps_reward(out_of_order, PROBLEM) == 0.0
    two_of_three = PERFECT.replace("3. Verification", "Verification")
    assert steps_reward(two_of_three, PROBLEM) == pytest.approx(2 / 3)


def test_verification_must_restate_the_problem():
    wrong_operands = PERFECT.replace("Verification: 23 + 15 + 8", "Verification: 23 + 15 + 9")
    assert verification_reward(wrong_operands, PROBLEM) == 0.0


@pytest.mark.parametrize("junk", ["1. Adding the first two: 23 + \x1f15 = 38", "1. Adding: 23 + 15 = \x1f38",
                                  "2. Adding: " + "9" * 5000 + " + 1 = 10", "1" * 5000 + ". step",
                                  "Verification: 23 + 15 + \u0668 is indeed 46.", "1. Adding: \u0662\u0663 + 15 = 38"])
def test_every_reward_survives_sampled_junk(junk):
    """Sampled bytes once crashed step validity (int(' \\x1f0')); junk earns nothing for its line, never an error."""
    completion = PERFECT.replace("3. Verification", junk + "\n3. Verification")
    components = reward_components(ADDITION_REWARDS, completion, PROBLEM)
    assert components["correctness"] == 1.0 and 0.0 <= components["step_validity"] <= 1.0
    assert step_validity_reward(f"<think>\n{junk}\n</think>\n46", PROBLEM) == 0.0
