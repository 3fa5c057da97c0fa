"""Shared-prefix GRPO training: each distinct prompt runs through the model once and its group's completions
attend to its keys and values. On both backends its log-probs, loss and gradients equal those of the
per-row path (every row carrying its own copy of its prompt) within fp32 tolerance, for every loss
variant, with the KL term, LoRA and full fine-tuning, in micro-batches that split groups."""
import dataclasses

import numpy as np
import pytest
import torch

from mlx.utils import tree_flatten

from shared.algorithms.padding import PrefixBlock, distinct_prompts, pack_batch, prefix_blocks
from shared.models.prompts import prompt_ids
from shared.tasks.addition.data import Problem
from shared.training.backend import GRPOBatch
from shared.training.config import GRPOConfig, ModelConfig
from reasoning_mlx.backend import MLXBackend
from reasoning_torch.backend import TorchBackend

FULL = ModelConfig(name="tiny", finetune="full")
LORA = dataclasses.replace(FULL, finetune="lora", lora_rank=4, lora_alpha=8.0)
# prompts of three lengths, a group of 4 samples each; some rows dropped, as rows without signal are
PROBLEMS = [Problem((23, 15, 8)), Problem((1, 2, 3)), Problem((99, 98, 97)), Problem((5, 40, 61))]
GROUP = 4
TRAINED = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14]
CASES = [("grpo", 0.0, 64, 1), ("dr_grpo", 0.04, 5, 1), ("dapo", 0.04, 64, 2), ("grpo", 0.04, 3, 2)]


def make_backend(name: str, folder, model: ModelConfig, micro_batch_size: int = 64):
    backend = TorchBackend(device="cpu", micro_batch_size=micro_batch_size) if name == "torch" else \
        MLXBackend(micro_batch_size=micro_batch_size)
    backend.seed(0)  # LoRA's initialisation: the same sampled batch every run
    backend.load(folder, model, trainable=True)
    backend.set_reference()  # the KL's reference: these starting weights
    return backend


def sampled_batch(backend):
    """The GRPO step's batch: each prompt G times, completions sampled from the model (lengths differ)."""
    prompts = [prompt_ids(backend.tokenizer, p) for p in PROBLEMS for _ in range(GROUP)]
    completions = backend.generate(prompts, 30, temperature=1.0, seed=0)
    assert len({len(c) for c in completions}) > 1
    chosen = [prompts[i] for i in TRAINED], [completions[i] for i in TRAINED]
    return pack_batch(*chosen, backend.tokenizer.pad_token_id)


def captured_gradients(backend) -> dict[str, np.ndarray]:
    """The gradients of the backend's next optimiser steps, by name, the update itself left out (the weights
    stay as they are)."""
    captured = {}
    if isinstance(backend, TorchBackend):
        def capture(lr, settings):
            captured.update({name: p.grad.numpy().copy() for name, p in backend.model.named_parameters()
                             if p.grad is not None})
            backend.model.zero_grad(set_to_none=True)
            return 0.0
        backend.optimizer_step = capture
    else:
        def capture(gradients, lr, settings):
            captured.update({name: np.array(g) for name, g in tree_flatten(gradients)})
            return 0.0
        backend.apply_gradients = capture
    return captured


def gradients_of_a_step(backend, batch: GRPOBatch, settings: GRPOConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """(stats, gradients) of one GRPO step, the optimiser update left out (the weights stay as they are)."""
    captured = captured_gradients(backend)
    return backend.grpo_step(batch, 1e-3, settings), captured


def both_paths(backend, settings: GRPOConfig):
    """For the per-row path, then the shared-prefix one, from the same weights: (old, ref, stats, gradients)."""
    tokens = sampled_batch(backend)
    advantages = np.random.default_rng(1).normal(size=len(tokens)).astype(np.float32)
    results = []
    for shared in (False, True):
        backend.shared_prefix = shared
        ref = backend.completion_logprobs(tokens, settings.temperature, reference=True) if settings.beta else None
        old = backend.completion_logprobs(tokens, settings.temperature) if settings.updates_per_batch > 1 else None
        batch = GRPOBatch(tokens, advantages, old, ref, sampled_sequences=len(PROBLEMS) * GROUP,
                          sampled_completion_tokens=int(tokens.completion_mask.sum()) + 17)
        results.append((old, ref, *gradients_of_a_step(backend, batch, settings)))
    return results


def trained_a_little(backend):
    """A few updates away from the reference (LoRA's B starts at zero): the adapters and the KL are non-trivial."""
    tokens = sampled_batch(backend)
    advantages = np.linspace(-1, 1, len(tokens)).astype(np.float32)
    for _ in range(3):
        backend.grpo_step(GRPOBatch(tokens, advantages, None, None), 1e-2, GRPOConfig())


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@pytest.mark.parametrize("model", [FULL, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("variant,beta,micro_batch_size,updates", CASES)
def test_shared_prefix_step_equals_the_per_row_step(tiny_model_dir, backend_name, model, variant, beta,
                                                     micro_batch_size, updates):
    backend = make_backend(backend_name, tiny_model_dir, model, micro_batch_size)
    if model.finetune == "lora" or beta:
        trained_a_little(backend)
    settings = GRPOConfig(loss_variant=variant, beta=beta, updates_per_batch=updates, temperature=0.9,
                          max_new_tokens=30)
    (old_rows, ref_rows, stats_rows, grads_rows), (old_prefix, ref_prefix, stats_prefix, grads_prefix) = \
        both_paths(backend, settings)
    for rows, prefix in ((old_rows, old_prefix), (ref_rows, ref_prefix)):
        if rows is not None:
            np.testing.assert_allclose(prefix, rows, atol=2e-5)
    if beta:
        assert stats_rows["kl"] > 1e-6  # the KL term is exercised
    for name in ("loss", "kl", "clip_fraction"):
        assert stats_prefix[name] == pytest.approx(stats_rows[name], rel=1e-4, abs=1e-7), name
    assert grads_rows.keys() == grads_prefix.keys() and grads_rows
    for name, expected in grads_rows.items():
        scale = max(float(np.abs(expected).max()), 1e-8)
        np.testing.assert_allclose(grads_prefix[name] / scale, expected / scale, atol=2e-4, err_msg=name)


def wrong_blocks(mistake: str):
    """prefix_blocks with one mistake: rows attend to the next prompt's keys and values ('prompt'), or
    every prompt loses its first token, which shifts the completions' positions by one ('position')."""
    def blocks(batch, max_rows):
        made = prefix_blocks(batch, max_rows)
        if mistake == "prompt":
            return [dataclasses.replace(b, prompts=np.roll(b.prompts, 1, axis=0)) if len(b.prompts) > 1 else b
                    for b in made]
        return [dataclasses.replace(b, prompts=b.prompts[:, 1:]) for b in made]
    return blocks


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@pytest.mark.parametrize("mistake", ["prompt", "position"])
def test_the_comparison_catches_a_wrong_prefix(tiny_model_dir, monkeypatch, backend_name, mistake):
    backend = make_backend(backend_name, tiny_model_dir, FULL)
    prompts = [prompt_ids(backend.tokenizer, p) for p in [Problem((23, 15, 8)), Problem((61, 40, 5))]
               for _ in range(GROUP)]
    tokens = pack_batch(prompts, backend.generate(prompts, 30, temperature=1.0, seed=0), backend.tokenizer.pad_token_id)
    backend.shared_prefix = False
    rows = backend.completion_logprobs(tokens)
    backend.shared_prefix = True
    np.testing.assert_allclose(backend.completion_logprobs(tokens), rows, atol=2e-5)
    module = "reasoning_torch.backend" if backend_name == "torch" else "reasoning_mlx.backend"
    monkeypatch.setattr(f"{module}.prefix_blocks", wrong_blocks(mistake))
    assert np.abs(backend.completion_logprobs(tokens) - rows).max() > 1e-2


def test_prefix_blocks_run_each_prompt_once_and_give_back_the_batch_columns():
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7], [8, 9], [1, 2, 3]]
    completions = [[11], [12, 13], [14, 15, 16], [17], [18], [19, 20]]
    batch = pack_batch(prompts, completions, pad_id=0)
    blocks = prefix_blocks(batch, max_rows=3)
    assert sorted(r for b in blocks for r in b.rows) == list(range(6))
    for block in blocks:
        assert isinstance(block, PrefixBlock) and len(block.rows) <= 3
        assert len(block.prompts) == len(distinct_prompts(block.prompts.tolist())[0])  # each prompt once
        for row, prompt_index, completion in zip(block.rows, block.prompt_of_row, block.completions):
            assert block.prompts[prompt_index].tolist() == prompts[row]
            assert completion[:len(completions[row])].tolist() == completions[row]
            assert (completion[len(completions[row]):] == 0).all()
            columns = batch.completion_mask[row, block.columns]
            assert columns[:len(completions[row])].all() and not columns[len(completions[row]):].any()
    assert {len(b.prompts[0]) for b in blocks} == {2, 3}
    three_token_blocks = [b for b in blocks if b.prompts.shape[1] == 3]
    assert [len(b.rows) for b in three_token_blocks] == [3, 1]  # [5,6,7] x3, then [1,2,3]
