from shared.tasks.addition.data import Problem, generate_problems, is_held_out, reasoning_target


def test_target_is_the_seed_example_output():
    assert reasoning_target(Problem((23, 15, 8))) == (
        "<think>\n"
        "I need to calculate the sum of 23, 15, and 8.\n"
        "1. Adding the first two: 23 + 15 = 38\n"
        "2. Adding the third: 38 + 8 = 46\n"
        "3. Verification: 23 + 15 + 8 is indeed 46.\n"
        "</think>\n"
        "46"
    )


def test_targets_for_other_operand_counts():
    assert "sum of 4 and 5." in reasoning_target(Problem((4, 5)))
    four = reasoning_target(Problem((1, 2, 3, 4)))
    assert "3. Adding the fourth: 6 + 4 = 10\n4. Verification: 1 + 2 + 3 + 4 is indeed 10." in four
    assert four.endswith("</think>\n10")


def test_prompt_and_answer():
    problem = Problem((23, 15, 8))
    assert problem.prompt == "Calculate 23 + 15 + 8"
    assert problem.answer == 46


def test_train_and_eval_never_overlap_and_are_seeded():
    train = generate_problems(3000, seed=1, held_out=False)
    held_out = generate_problems(300, seed=1, held_out=True)
    assert not set(train) & set(held_out)
    assert all(is_held_out(p) for p in held_out) and not any(is_held_out(p) for p in train)
    assert len(set(train)) == 3000
    assert generate_problems(50, seed=1, held_out=False) == train[:50]
    assert generate_problems(50, seed=2, held_out=False) != train[:50]


def test_operand_range_and_count():
    problems = generate_problems(500, seed=0, held_out=False, num_operands=4, low=100, high=999)
    assert all(len(p.operands) == 4 and all(100 <= n <= 999 for n in p.operands) for p in problems)


def test_asking_for_more_problems_than_exist_fails_clearly():
    import pytest

    with pytest.raises(ValueError, match="at most 2"):
        generate_problems(100, seed=0, held_out=True, num_operands=2, low=1, high=9)
