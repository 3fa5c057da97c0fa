import dataclasses

import numpy as np
import pytest
import torch

from shared.algorithms.grpo import LOSS_VARIANTS, grpo_loss as reference_grpo_loss
from shared.algorithms.padding import pack_batch
from shared.models.prompts import prompt_ids, target_ids
from shared.tasks.addition.data import Problem, reasoning_target
from shared.training.backend import GRPOBatch
from shared.training.config import GRPOConfig, ModelConfig, SFTConfig
from reasoning_torch.backend import TorchBackend
from reasoning_torch.losses import grpo_loss, to_tensors

FULL = ModelConfig(name="tiny", finetune="full")
PAD = 0  # the tiny tokenizer's <|endoftext|>
PROBLEMS = [Problem((23, 15, 8)), Problem((1, 2, 3)), Problem((99, 98, 97))]


@pytest.fixture()
def backend(tiny_model_dir):
    torch.manual_seed(0)
    backend = TorchBackend(device="cpu")
    backend.load(tiny_model_dir, FULL, trainable=True)
    return backend


def encoded(backend, problems=PROBLEMS):
    return ([prompt_ids(backend.tokenizer, p) for p in problems],
            [target_ids(backend.tokenizer, p) for p in problems])


def test_pack_batch_positions_follow_the_mask():
    batch = pack_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    np.testing.assert_array_equal(batch.input_ids, [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch.completion_mask, [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(batch.position_ids[1, 2:], [0, 1, 2, 3])


def test_logprobs_do_not_depend_on_padding(backend):
    """A completion scores the same alone and beside a longer prompt: padding is masked, positions follow the mask."""
    prompts, completions = encoded(backend)
    together = backend.completion_logprobs(pack_batch(prompts, completions, PAD))
    for row in range(len(prompts)):
        alone = backend.completion_logprobs(pack_batch(prompts[row:row + 1], completions[row:row + 1], PAD))
        got = together[row][together[row] != 0]
        np.testing.assert_allclose(got, alone[0][alone[0] != 0], atol=1e-5)
    # the same check fails when the padding is attended to: the test can tell
    broken = pack_batch(prompts, completions, PAD)
    broken.attention_mask = np.ones_like(broken.attention_mask)
    wrong = backend.completion_logprobs(broken)
    shortest = int(np.argmin([len(p) for p in prompts]))
    alone = backend.completion_logprobs(pack_batch(prompts[shortest:shortest + 1], completions[shortest:shortest + 1], PAD))
    assert not np.allclose(wrong[shortest][wrong[shortest] != 0], alone[0][alone[0] != 0], atol=1e-3)


def test_greedy_generation_matches_teacher_forced_argmax(backend):
    prompts, _ = encoded(backend)
    completions = backend.generate(prompts, max_new_tokens=24, temperature=0.0)
    tensors = to_tensors(pack_batch(prompts, completions, PAD), backend.device)
    with torch.no_grad():
        logits = backend.model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                               position_ids=tensors["position_ids"]).logits
    width = max(len(p) for p in prompts)
    for row, completion in enumerate(completions):
        predicted = logits[row, width - 1: width - 1 + len(completion)].argmax(-1).tolist()
        assert predicted == completion


def test_sampling_is_seeded(backend):
    prompts, _ = encoded(backend)
    first = backend.generate(prompts, 16, temperature=1.0, seed=3)
    assert backend.generate(prompts, 16, temperature=1.0, seed=3) == first
    assert backend.generate(prompts, 16, temperature=1.0, seed=4) != first


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_torch_grpo_loss_matches_numpy_reference(variant):
    rng = np.random.default_rng(0)
    new, old, ref = (np.log(rng.uniform(0.05, 1, size=(4, 6))) for _ in range(3))
    mask = (rng.uniform(size=(4, 6)) > 0.3).astype(np.float64)
    advantages = rng.normal(size=4)
    settings = GRPOConfig(loss_variant=variant, epsilon=0.2, beta=0.05, max_new_tokens=6)
    expected = reference_grpo_loss(new, old, advantages, mask, variant=variant, epsilon=0.2, beta=0.05,
                                   ref_logprobs=ref, max_completion_tokens=6)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float64)
    got = grpo_loss(as_tensor(new), as_tensor(old), as_tensor(advantages), as_tensor(mask), settings,
                    as_tensor(ref), total_sequences=4, total_tokens=int(mask.sum()), max_completion_tokens=6)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_micro_batches_give_the_same_update(tiny_model_dir):
    """Gradient accumulation over micro-batches equals one big batch, for SFT and each GRPO variant."""
    results = []
    for micro in (4, 1):
        backend = TorchBackend(device="cpu", micro_batch_size=micro)
        backend.load(tiny_model_dir, FULL, trainable=True)
        prompts, completions = encoded(backend, PROBLEMS + [Problem((5, 6, 7))])
        batch = pack_batch(prompts, completions, PAD)
        sft = backend.sft_step(batch, 1e-3, SFTConfig(max_grad_norm=1e9, weight_decay=0.0))
        stats = backend.grpo_step(GRPOBatch(batch, np.array([1.0, -1.0, 0.5, -0.5], np.float32), None, None),
                                  1e-3, GRPOConfig(loss_variant="dapo", max_grad_norm=1e9))
        results.append((sft["loss"], stats["loss"], backend.model.model.embed_tokens.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)
    torch.testing.assert_close(results[0][2], results[1][2], atol=1e-6, rtol=1e-5)


def test_sft_steps_lower_the_loss(backend):
    prompts, completions = encoded(backend)
    batch = pack_batch(prompts, completions, PAD)
    losses = [backend.sft_step(batch, 3e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))["loss"] for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]


def test_grpo_step_moves_probability_toward_positive_advantage(backend):
    prompts, _ = encoded(backend, [PROBLEMS[0]] * 2)
    good = target_ids(backend.tokenizer, PROBLEMS[0])
    bad = backend.tokenizer.encode(reasoning_target(Problem((23, 15, 9))), add_special_tokens=False) + [good[-1]]
    batch = pack_batch(prompts, [good, bad], PAD)
    before = backend.completion_logprobs(batch).sum(1)
    settings = GRPOConfig(loss_variant="grpo", max_new_tokens=len(good))
    for _ in range(3):
        backend.grpo_step(GRPOBatch(batch, np.array([1.0, -1.0], np.float32), None, None), 1e-3, settings)
    after = backend.completion_logprobs(batch).sum(1)
    # the two share most tokens, so watch the margin between them
    assert after[0] - after[1] > before[0] - before[1] + 1.0


def test_lora_trains_only_adapters_and_reference_is_the_base(tiny_model_dir):
    backend = TorchBackend(device="cpu")
    backend.load(tiny_model_dir, dataclasses.replace(FULL, finetune="lora", lora_rank=4), trainable=True)
    trainable = [n for n, p in backend.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    prompts, completions = encoded(backend)
    batch = pack_batch(prompts, completions, PAD)
    for _ in range(3):
        backend.sft_step(batch, 1e-2, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    policy = backend.completion_logprobs(batch)
    reference = backend.completion_logprobs(batch, reference=True)
    plain = TorchBackend(device="cpu")
    plain.load(tiny_model_dir, FULL, trainable=False)
    np.testing.assert_allclose(reference, plain.completion_logprobs(batch), atol=1e-5)
    assert not np.allclose(policy, reference, atol=1e-3)


def test_optimizer_moments_travel_with_the_checkpoint(backend, tmp_path):
    """A checkpoint resumes with the same AdamW moments: the next step equals an uninterrupted one."""
    prompts, completions = encoded(backend)
    batch = pack_batch(prompts, completions, PAD)
    for _ in range(2):
        backend.sft_step(batch, 1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    backend.save(tmp_path)
    assert (tmp_path / "optimizer.safetensors").exists()
    resumed = TorchBackend(device="cpu")
    resumed.load(tmp_path, FULL, trainable=True)
    backend.sft_step(batch, 1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    resumed.sft_step(batch, 1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    for (name, mine), (_, theirs) in zip(backend.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5, msg=name)
    (tmp_path / "optimizer.safetensors").unlink()
    fresh = TorchBackend(device="cpu")
    fresh.load(tmp_path, FULL, trainable=True)
    fresh.sft_step(batch, 1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    embedding = lambda b: b.model.model.embed_tokens.weight
    assert not torch.allclose(embedding(fresh), embedding(resumed), atol=1e-6)  # the moments mattered
