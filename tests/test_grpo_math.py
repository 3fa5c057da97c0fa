import numpy as np
import pytest

from shared.algorithms.grpo import aggregate, group_advantages, grpo_loss, per_token_kl


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = group_advantages(rewards, eps=0.0 + 1e-12)
    # group 1: mean 0.5, std 0.5 -> +-1; group 2: all equal -> 0 (nothing to prefer)
    np.testing.assert_allclose(advantages, [[1, -1, -1, 1], [0, 0, 0, 0]], atol=1e-9)
    np.testing.assert_allclose(group_advantages(rewards, scale_by_std=False), [[0.5, -0.5, -0.5, 0.5], [0] * 4])


def test_group_advantages_eps_keeps_tiny_spreads_finite():
    advantages = group_advantages(np.array([[1.0, 1.0 + 1e-9]]))
    assert np.all(np.isfinite(advantages)) and np.abs(advantages).max() < 1e-4


def test_kl_estimator_is_zero_at_equality_and_positive_elsewhere():
    new = np.log(np.array([[0.5, 0.2]]))
    assert per_token_kl(new, new) == pytest.approx(np.zeros((1, 2)))
    ref = np.log(np.array([[0.25, 0.4]]))
    kl = per_token_kl(new, ref)
    # k3 = r - log r - 1 with r = ref / new
    np.testing.assert_allclose(kl, [[0.5 - np.log(0.5) - 1, 2 - np.log(2) - 1]])


PER_TOKEN = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_aggregation_variants_by_hand():
    assert aggregate(PER_TOKEN, MASK, "grpo", 4) == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)  # 3.0
    assert aggregate(PER_TOKEN, MASK, "dapo", 4) == pytest.approx((1 + 2 + 3 + 4) / 4)  # 2.5
    assert aggregate(PER_TOKEN, MASK, "dr_grpo", 4) == pytest.approx((1 + 2 + 3 + 4) / (2 * 4))  # 1.25
    with pytest.raises(ValueError, match="unknown loss variant"):
        aggregate(PER_TOKEN, MASK, "ppo", 4)


def test_loss_on_policy_is_minus_mean_advantage():
    logprobs = np.log(np.full((2, 3), 0.3))
    mask = np.ones((2, 3))
    loss = grpo_loss(logprobs, logprobs, np.array([1.0, -3.0]), mask, variant="grpo")
    assert loss == pytest.approx(-(1.0 - 3.0) / 2)


def test_ratio_clipping_by_hand():
    old = np.log(np.array([[0.5, 0.5]]))
    new = np.log(np.array([[0.8, 0.2]]))  # ratios 1.6 and 0.4
    mask = np.ones((1, 2))
    # positive advantage: min(1.6, 1.2) = 1.2 and min(0.4, 0.8) = 0.4
    assert grpo_loss(new, old, np.array([1.0]), mask, epsilon=0.2, variant="dapo") == pytest.approx(-(1.2 + 0.4) / 2)
    # negative advantage: min(-1.6, -1.2) = -1.6 and min(-0.4, -0.8) = -0.8
    assert grpo_loss(new, old, np.array([-1.0]), mask, epsilon=0.2, variant="dapo") == pytest.approx((1.6 + 0.8) / 2)


def test_kl_term_adds_beta_times_kl():
    old = new = np.log(np.array([[0.5, 0.5]]))
    ref = np.log(np.array([[0.25, 0.5]]))
    mask = np.ones((1, 2))
    loss = grpo_loss(new, old, np.array([0.0]), mask, beta=0.1, ref_logprobs=ref, variant="dapo")
    assert loss == pytest.approx(0.1 * (0.5 - np.log(0.5) - 1) / 2)


def test_rows_per_pass_keeps_the_logits_of_a_pass_bounded():
    from shared.algorithms.padding import LOGITS_PER_PASS, rows_per_pass

    assert rows_per_pass(64, 140, 49_152) == 9  # SmolLM2: a large vocabulary, few rows at a time
    assert rows_per_pass(64, 200, 384) == 64  # the tiny model: the micro-batch size decides
    assert rows_per_pass(64, 10**6, 151_936) == 1  # never none
    assert 9 * 140 * 49_152 <= LOGITS_PER_PASS < 10 * 140 * 49_152
