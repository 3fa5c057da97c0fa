"""Speculative decoding with n-gram drafts: the drafter, the learnt draft length, and rollouts that are
token-for-token the plain decoder's (greedy and sampled), whose sampled tokens follow the policy."""
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.algorithms.drafts import DraftLength, NgramDrafter, accepted_drafts
from shared.models.prompts import load_tokenizer, prompt_ids, stop_token_ids
from shared.tasks.addition.data import Problem
from reasoning_mlx.generate import generate as mlx_generate
from reasoning_torch.generate import generate as torch_generate

PROBLEMS = [Problem((23, 15, 8)), Problem((1, 2, 3)), Problem((99, 98, 97)), Problem((5, 40, 61))]


def test_a_row_keeps_its_drafts_up_to_the_first_that_differs_from_the_sample():
    samples = np.array([[7, 8, 9, 1], [7, 5, 9, 1], [3, 8, 9, 1]])
    drafts = np.array([[7, 8, 9], [7, 8, 9], [7, -1, -1]])
    assert accepted_drafts(samples, drafts).tolist() == [3, 1, 0]
    assert accepted_drafts(samples[:, :1], drafts[:, :0]).tolist() == [0, 0, 0]


def test_drafts_come_from_the_row_then_its_group_then_earlier_completions():
    drafter = NgramDrafter(longest=3, shortest=2)
    drafter.finish([[1, 2, 3, 4, 5, 6]])  # an earlier call's completion
    drafter.start([[9, 9, 1, 2], [8, 8], [8, 8]], np.array([0, 1, 1]))
    assert drafter.draft(0, 3) == [3, 4, 5]  # "1 2" was followed by "3 4 5" in an earlier completion
    drafter.extend(0, [7, 1, 2])
    assert drafter.draft(0, 3) == [7, 1, 2]  # its own "1 2" (most recent, and its own) comes first
    drafter.extend(1, [4, 4, 5])
    drafter.draft(1, 1)  # a row is indexed when it drafts
    drafter.extend(2, [4, 4])
    assert drafter.draft(2, 2) == [5]  # "4 4" from its group's other row; nothing after that yet
    assert drafter.draft(2, 0) == []


def chosen_lengths(cost_of, tokens_of, steps: int = 40) -> list[int]:
    """The lengths DraftLength picks when a step of length k makes tokens_of(k) tokens in cost_of(k) s."""
    lengths, chosen = DraftLength(lengths=(0, 2, 4, 8), window=2, every=2), []
    for _ in range(steps):
        length = lengths.choose()
        chosen.append(length)
        lengths.record(length, tokens_of(length), cost_of(length))
    return chosen


def test_draft_length_climbs_while_it_pays_and_turns_drafting_off_where_it_loses():
    losing = chosen_lengths(cost_of=lambda k: 1.0 + k, tokens_of=lambda k: 100)
    assert losing[:2] == [0, 2] and set(losing[2:6]) == {0}  # after a lost window, 2 windows' worth of plain steps
    assert set(losing) == {0, 2} and losing.count(2) <= len(losing) // 5  # one step in 6 tries 2 again
    paying = chosen_lengths(cost_of=lambda k: 1.0, tokens_of=lambda k: 100 + 10 * k)
    assert paying[:6] == [0, 2, 2, 4, 4, 8]  # climbing window after window, up to 8
    assert set(paying[6:]) == {4, 8} and paying[6:].count(8) > 0.8 * len(paying[6:])  # looking down now and then


def decoder(backend: str, folder):
    """(sample(prompts, max_new_tokens, temperature, stop_ids, seed, drafter, stats), tokenizer) on a backend."""
    tokenizer = load_tokenizer(folder)
    if backend == "torch":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return (lambda prompts, new, temperature, stops, seed, drafter=None, stats=None: torch_generate(
            model, prompts, new, temperature, stops, tokenizer.pad_token_id, seed,
            drafter=drafter, stats=stats)), tokenizer
    from mlx_lm import load
    model, _ = load(str(folder))
    return (lambda prompts, new, temperature, stops, seed, drafter=None, stats=None: mlx_generate(
        model, prompts, new, temperature, stops, tokenizer.pad_token_id, seed, drafter, stats)), tokenizer


BACKENDS = pytest.mark.parametrize("backend", ["torch", "mlx"])


@BACKENDS
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_rollouts_are_the_plain_decoders_token_for_token(tiny_model_dir, backend, temperature):
    sample, tokenizer = decoder(backend, tiny_model_dir)
    stops = stop_token_ids(tokenizer)
    prompts = [prompt_ids(tokenizer, p) for p in PROBLEMS for _ in range(4)]
    plain = sample(prompts, 60, temperature, stops, 3)
    drafter, stats = NgramDrafter(draft_lengths=(4,), most_rows=len(prompts)), {}
    for call in range(2):  # the second call also drafts from the first call's completions
        assert sample(prompts, 60, temperature, stops, 3, drafter, stats) == plain
    assert stats["accepted"] > 0 and stats["forwards"] < max(len(c) for c in plain)  # drafts were kept
    one_more = NgramDrafter(draft_lengths=(4,), most_rows=len(prompts) - 1)  # a larger batch decodes plainly
    assert sample(prompts, 60, temperature, stops, 3, one_more, stats) == plain and stats["drafted"] == 0


class FixedDraft(NgramDrafter):
    """Always drafts the same token: the verification decides alone what is sampled."""

    def __init__(self, token: int):
        super().__init__(draft_lengths=(1,), most_rows=10**6)
        self.token = token

    def draft(self, row: int, count: int) -> list[int]:
        return [self.token][:count]


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> tuple[float, int]:
    """(statistic, degrees of freedom) of counts against probabilities, bins expecting < 5 pooled."""
    expected = probabilities * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@BACKENDS
@torch.no_grad()
def test_speculative_sampling_draws_the_policys_distribution(tiny_model_dir, monkeypatch, backend):
    """The second token of 8,000 rollouts, its first position verified against a fixed draft, against the
    model's exact marginal p(t2) = sum_t1 p(t1) p(t2 | t1); a rule that keeps drafts it should not fails."""
    sample, tokenizer = decoder(backend, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    temperature, prompt = 0.2, prompt_ids(tokenizer, PROBLEMS[0])  # the draft then has p ~ 0.5
    first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
    vocabulary = len(first)
    following = torch.cat([torch.tensor([prompt] * vocabulary), torch.arange(vocabulary)[:, None]], 1)
    second = torch.softmax(model(following).logits[:, -1] / temperature, -1)
    marginal = (first[:, None] * second).sum(0).double().numpy()
    draft = int(np.argmax(marginal))

    def second_tokens() -> tuple[np.ndarray, dict]:
        counts, stats = np.zeros(vocabulary, dtype=np.int64), {"drafted": 0, "accepted": 0}
        for seed in range(4):
            call = {}
            rows = sample([prompt] * 2000, 3, temperature, set(), seed, FixedDraft(draft), call)
            counts += np.bincount([row[1] for row in rows], minlength=vocabulary)
            stats = {name: stats[name] + call[name] for name in stats}
        return counts, stats

    counts, stats = second_tokens()
    assert 2000 < stats["accepted"] < 6000 and stats["drafted"] == 8000  # drafts both kept and rejected, often
    statistic, freedom = chi_square(counts, marginal)
    assert statistic < freedom + 6 * math.sqrt(2 * freedom)
    monkeypatch.setattr("shared.algorithms.drafts.accepted_drafts",
                        lambda samples, drafts: np.full(len(samples), drafts.shape[1]))  # keeps every draft
    wrong, _ = second_tokens()
    statistic, freedom = chi_square(wrong, marginal)
    assert statistic > freedom + 6 * math.sqrt(2 * freedom)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_both_backends_sample_the_same_tokens_from_the_same_seed(tiny_model_dir, temperature):
    """The uniform number of each position comes from the seed alone, so PyTorch and MLX, given the same
    weights, sample the same rollouts (and so train on the same ones)."""
    (torch_sample, tokenizer), (mlx_sample, _) = decoder("torch", tiny_model_dir), decoder("mlx", tiny_model_dir)
    prompts = [prompt_ids(tokenizer, p) for p in PROBLEMS for _ in range(4)]
    stops = stop_token_ids(tokenizer)
    rows = torch_sample(prompts, 40, temperature, stops, 5)
    assert mlx_sample(prompts, 40, temperature, stops, 5) == rows
    assert len({tuple(row) for row in rows}) > len(PROBLEMS) or temperature == 0  # the samples of a group differ
