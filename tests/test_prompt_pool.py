"""GRPO prompts that teach: the pass-rate pool and its draw, dynamic sampling in the real GRPO loop (groups
whose rewards all agree are dropped, refilled and left out of the loss), and mean@k / maj@k / pass@k."""
import numpy as np
import pytest

from shared.algorithms.prompt_pool import PromptPool, informative_groups
from shared.tasks.addition.data import Problem
from shared.tasks.addition.rewards import ADDITION_REWARDS
from shared.training.evaluation import sampled_accuracies

PROBLEM = Problem((1, 2, 3))
RIGHT = PROBLEM.completion


def wrong(answer) -> str:
    return f"<think>\n1. 1 + 2 = 3\n</think>\n{answer}"


def test_weights_favour_a_50_percent_pass_rate_and_drop_solved_prompts():
    pool = PromptPool(4)
    pool.record(1, [True] * 4 + [False] * 4)
    pool.record(2, [True] * 8)
    pool.record(3, [False] * 8)
    weights = pool.draw_weights()
    assert weights[0] == pytest.approx(0.25) and weights[1] == pytest.approx(0.25)  # untried = half right
    assert weights[2] == 0.0
    assert 0 < weights[3] < 0.1
    assert pool.solved().tolist() == [False, False, True, False]


def test_draw_is_in_proportion_to_the_weights_and_never_repeats_or_returns_solved():
    pool = PromptPool(3)
    pool.record(0, [True] * 4 + [False] * 4)  # weight 0.25
    pool.record(1, [True] * 7 + [False])  # 0.8 -> 0.16
    pool.record(2, [True] * 8)
    rng = np.random.default_rng(0)
    first = [pool.draw(rng, 1)[0] for _ in range(4000)]
    assert 2 not in first
    assert np.mean(np.array(first) == 0) == pytest.approx(0.25 / 0.41, abs=0.03)
    assert sorted(pool.draw(rng, 5)) == [0, 1]  # fewer eligible than asked: all of them
    assert pool.draw(rng, 2, exclude={0}) == [1]


def test_a_wholly_solved_set_is_drawn_again_rather_than_not_at_all():
    pool = PromptPool(2)
    pool.record(0, [True] * 8)
    pool.record(1, [True] * 8)
    assert sorted(pool.draw(np.random.default_rng(0), 2)) == [0, 1]


def test_the_pool_round_trips_through_its_saved_form():
    pool = PromptPool(3)
    pool.record(2, [True, False])
    pool.count_groups(4, 3)
    again = PromptPool(**pool.to_dict())
    assert again == pool and again.informative_share() == pytest.approx(4 / 5)


def test_informative_groups_are_those_whose_rewards_differ():
    scores = np.array([[1.0, 1.0, 1.0], [0.0, 1.2, 0.0], [0.2, 0.2, 0.2], [0.0, 0.0, 1e-3]])
    assert informative_groups(scores).tolist() == [1, 3]


def test_mean_majority_and_any_of_k_samples():
    other = Problem((2, 2, 2))
    result = sampled_accuracies(ADDITION_REWARDS, [PROBLEM, other, PROBLEM], [
        [RIGHT, wrong(7), wrong(7), RIGHT],  # 6, 7, 7, 6: a tie, the answer given first wins
        [wrong(5), wrong(5), "no answer at all", RIGHT],  # the majority is wrong, one sample right
        ["rambling", "more rambling", wrong(6), wrong(9)]])  # answers without a format still vote
    assert result["mean_at_k"] == pytest.approx(np.mean([0.5, 0.25, 0.25]))
    assert result["maj_at_k"] == pytest.approx(2 / 3)
    assert result["pass_at_k"] == 1.0


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ(backend_name, tiny_model_dir, monkeypatch):
    """Even problems score the same for every sample, odd ones alternate: a step keeps only odd groups, refills
    for the even ones it drew, and its loss counts only the kept rows; without dynamic sampling every row counts."""
    import shared.training.loops as training
    from shared.tasks.addition.data import generate_problems
    from shared.training.config import GRPOConfig, ModelConfig
    from backends import make_backend

    problems = generate_problems(16, 0, held_out=False)
    index = {p.prompt: i for i, p in enumerate(problems)}
    monkeypatch.setattr(training, "score_group", lambda texts, problem, rewards: (
        [float(index[problem.prompt] % 2 and i % 2) for i in range(len(texts))],
        [{**training.reward_components(rewards, t, problem), "correctness": float(index[problem.prompt] % 2 and i % 2)}
         for i, t in enumerate(texts)]))
    backend = make_backend(backend_name)
    backend.load(tiny_model_dir, ModelConfig(name="tiny", finetune="full"), trainable=True)
    normalisers = []
    step = backend.grpo_step
    monkeypatch.setattr(backend, "grpo_step", lambda batch, lr, settings: (
        normalisers.append((batch.sampled_sequences, len(batch.tokens))), step(batch, lr, settings))[1])
    settings = GRPOConfig(num_prompts=16, group_size=2, prompts_per_step=2, lr=1e-5, max_new_tokens=8, save_every=0,
                          rollout_budget=4.0)

    pool, records = PromptPool(16), []
    list(training.train_grpo(backend, problems, settings, 0, records.append, rewards=ADDITION_REWARDS, pool=pool))
    assert len(records) == 8
    for record, (sequences, rows) in zip(records, normalisers):
        assert record["informative_groups"] >= 2 and record["sampled_groups"] <= 8
        assert sequences == rows == 2 * record["informative_groups"] == record["trained_sequences"]
        assert record["rollouts_per_kept_group"] == 2 * record["sampled_groups"] / record["informative_groups"]
    tried = np.flatnonzero(pool.attempts)
    assert sum(pool.attempts) == 2 * sum(r["sampled_groups"] for r in records)
    assert all(pool.correct[i] == pool.attempts[i] // 2 * (i % 2) for i in tried)  # odd: half right; even: none
    assert records[-1]["prompts_tried"] == len(tried)

    normalisers.clear()
    uniform = []
    list(training.train_grpo(backend, problems, settings, 0, uniform.append, rewards=ADDITION_REWARDS))
    assert [r["sampled_groups"] for r in uniform] == [2] * 8
    assert [s for s, _ in normalisers] == [4] * len(normalisers)  # every sampled row, kept or not
    assert all(r["trained_sequences"] == 2 * r["informative_groups"] for r in uniform)
