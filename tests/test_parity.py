"""PyTorch and MLX held to the same numbers: identical tiny-model weights loaded in both, fp32.

Each check also shows it can fail: a deliberately broken MLX side (a RoPE variant, no
mask handling, the wrong loss, a wrong LoRA scale, AdamW without bias correction) misses the
tolerance that the real one meets.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from shared.algorithms.grpo import LOSS_VARIANTS
from shared.algorithms.padding import pack_batch
from shared.models.prompts import encode_prompts, encode_targets
from shared.tasks.addition.data import Problem, generate_problems
from shared.training.backend import GRPOBatch
from shared.training.config import ADAM_BETAS, GRPOConfig, ModelConfig, SFTConfig
from reasoning_mlx.backend import MLXBackend
from reasoning_mlx.batching import leading_padding, roll_rows
from reasoning_mlx.losses import token_logprobs as mlx_token_logprobs
from reasoning_torch.backend import TorchBackend
from reasoning_torch.losses import sft_loss, to_tensors

FULL = ModelConfig(name="tiny", finetune="full")
LORA = dataclasses.replace(FULL, finetune="lora", lora_rank=4, lora_alpha=8.0)
PAD = 0


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after a few SFT steps: confident enough that greedy decoding has no near-ties."""
    torch.manual_seed(0)
    backend = TorchBackend(device="cpu")
    backend.load(tiny_model_dir, FULL, trainable=True)
    problems = generate_problems(32 * 60, seed=5, held_out=False)
    prompts, targets = encode_prompts(backend.tokenizer, problems), encode_targets(backend.tokenizer, problems)
    for start in range(0, len(problems), 32):
        batch = pack_batch(prompts[start:start + 32], targets[start:start + 32], PAD)
        backend.sft_step(batch, 3e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    folder = tmp_path_factory.mktemp("trained")
    backend.model.save_pretrained(str(folder), safe_serialization=True)
    backend.tokenizer.save_pretrained(str(folder))
    return folder


def both(folder, config=FULL, trainable=True):
    torch_backend, mlx_backend = TorchBackend(device="cpu"), MLXBackend()
    torch_backend.load(folder, config, trainable)
    mlx_backend.load(folder, config, trainable)
    return torch_backend, mlx_backend


def sample_batch(tokenizer, count=6, seed=1):
    """Prompts of different lengths (left padding) with their SFT completions."""
    problems = generate_problems(count, seed=seed, held_out=True) + [Problem((7, 5)), Problem((123, 4, 56, 7))]
    return pack_batch(encode_prompts(tokenizer, problems), encode_targets(tokenizer, problems), PAD)


def break_rope(mlx_backend):
    for layer in mlx_backend.model.layers:
        layer.self_attn.rope.traditional = True


def test_logits_match(trained_dir):
    torch_backend, mlx_backend = both(trained_dir, trainable=False)
    ids = np.random.default_rng(0).integers(3, 384, size=(4, 48))
    with torch.no_grad():
        expected = torch_backend.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.array(mlx_backend.model(mx.array(ids)))
    assert np.abs(got - expected).max() <= 1e-4
    break_rope(mlx_backend)
    assert np.abs(np.array(mlx_backend.model(mx.array(ids))) - expected).max() > 1e-2


def test_completion_logprobs_match_with_left_padding(trained_dir):
    torch_backend, mlx_backend = both(trained_dir, trainable=False)
    batch = sample_batch(torch_backend.tokenizer)
    assert leading_padding(batch.attention_mask).max() > 0
    expected = torch_backend.completion_logprobs(batch, temperature=0.7)
    assert np.abs(mlx_backend.completion_logprobs(batch, temperature=0.7) - expected).max() <= 1e-4
    # without rolling the padding to the right, mlx-lm's causal attention reads the pads
    unrolled = mlx_token_logprobs(mlx_backend.model, mx.array(batch.input_ids), 0.7)
    assert np.abs(np.array(unrolled) * batch.completion_mask - expected).max() > 1e-2


def test_sft_loss_matches(trained_dir):
    torch_backend, mlx_backend = both(trained_dir)
    batch = sample_batch(torch_backend.tokenizer)
    settings = SFTConfig(max_grad_norm=1.0, weight_decay=0.0)
    expected = torch_backend.sft_step(batch, 0.0, settings)["loss"]
    assert abs(mlx_backend.sft_step(batch, 0.0, settings)["loss"] - expected) <= 1e-5


def grpo_batch(torch_backend, rng, temperature):
    """Old log-probs near the policy's (ratios around 1, some beyond the clip range), a reference further off."""
    batch = sample_batch(torch_backend.tokenizer, count=8, seed=2)
    mask = batch.completion_mask
    policy = torch_backend.completion_logprobs(batch, temperature)
    old = ((policy + rng.normal(scale=0.3, size=mask.shape)) * mask).astype(np.float32)
    ref = ((policy + rng.normal(scale=0.5, size=mask.shape)) * mask).astype(np.float32)
    return GRPOBatch(batch, rng.normal(size=len(batch)).astype(np.float32), old, ref)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_grpo_loss_matches(trained_dir, variant):
    torch_backend, mlx_backend = both(trained_dir)
    settings = GRPOConfig(loss_variant=variant, beta=0.04, epsilon=0.2, temperature=0.9, max_new_tokens=120)
    batch = grpo_batch(torch_backend, np.random.default_rng(3), settings.temperature)
    expected = torch_backend.grpo_step(batch, 0.0, settings)
    got = mlx_backend.grpo_step(batch, 0.0, settings)
    assert 0.2 < expected["clip_fraction"] < 0.8 and expected["kl"] > 0.01  # both terms are exercised
    assert abs(got["loss"] - expected["loss"]) <= 1e-5
    assert got["clip_fraction"] == pytest.approx(expected["clip_fraction"], abs=1e-3)
    assert got["kl"] == pytest.approx(expected["kl"], abs=1e-4)
    other = LOSS_VARIANTS[(LOSS_VARIANTS.index(variant) + 1) % len(LOSS_VARIANTS)]
    wrong = mlx_backend.grpo_step(batch, 0.0, dataclasses.replace(settings, loss_variant=other))
    assert abs(wrong["loss"] - expected["loss"]) > 1e-5


def random_lora(torch_backend, mlx_backend, seed=0):
    """The same non-zero LoRA factors in both: PEFT's A (r, in) and B (out, r) are mlx-lm's a.T and b.T."""
    rng = np.random.default_rng(seed)
    torch_params = dict(torch_backend.model.named_parameters())
    updates = []
    for name, value in tree_flatten(mlx_backend.model.trainable_parameters()):
        module, leaf = name.rsplit(".", 1)
        factor = rng.normal(scale=0.05, size=value.shape[::-1]).astype(np.float32)
        torch_name = f"base_model.model.{module}.lora_{leaf[-1].upper()}.default.weight"
        with torch.no_grad():
            torch_params[torch_name].copy_(torch.from_numpy(factor))
        updates.append((name, mx.array(factor.T)))
    mlx_backend.model.load_weights(updates, strict=False)
    return updates


def mlx_lora_gradients(mlx_backend, batch):
    shifts = leading_padding(batch.attention_mask)
    ids, mask = mx.array(roll_rows(batch.input_ids, shifts)), mx.array(roll_rows(batch.completion_mask, shifts))
    total = int(batch.completion_mask.sum())

    def loss(ids, mask):
        return -(mlx_token_logprobs(mlx_backend.model, ids) * mask).sum() / total

    _, grads = nn.value_and_grad(mlx_backend.model, loss)(ids, mask)
    return dict(tree_flatten(grads))


def assert_lora_gradients_match(torch_grads, mlx_grads):
    for name, grad in mlx_grads.items():
        module, leaf = name.rsplit(".", 1)
        expected = torch_grads[f"base_model.model.{module}.lora_{leaf[-1].upper()}.default.weight"].T
        np.testing.assert_allclose(np.array(grad), expected, rtol=1e-3, atol=1e-5, err_msg=name)


def test_lora_gradients_match(trained_dir):
    torch_backend, mlx_backend = both(trained_dir, LORA)
    random_lora(torch_backend, mlx_backend)
    batch = sample_batch(torch_backend.tokenizer)
    sft_loss(torch_backend.model, to_tensors(batch, torch_backend.device), int(batch.completion_mask.sum())).backward()
    torch_grads = {n: p.grad.numpy() for n, p in torch_backend.model.named_parameters() if p.requires_grad}
    assert len(torch_grads) == len(mlx_lora_gradients(mlx_backend, batch)) > 0
    assert_lora_gradients_match(torch_grads, mlx_lora_gradients(mlx_backend, batch))
    # PEFT scales by alpha / r; an MLX side scaled by alpha fails the same check
    for _, module in mlx_backend.model.named_modules():
        if hasattr(module, "lora_a"):
            module.scale = LORA.lora_alpha
    with pytest.raises(AssertionError):
        assert_lora_gradients_match(torch_grads, mlx_lora_gradients(mlx_backend, batch))


def adamw_step_from_torch_gradients(torch_backend, mlx_backend, batch) -> float:
    """One AdamW step in each backend from the same gradients (PyTorch's); the largest weight difference.

    The gradients are shared because Adam divides by sqrt(v) + 1e-8: weights whose fp32 gradients are
    ~1e-9 (cancellations, ill-conditioned in any float32 code) would otherwise dominate the comparison;
    gradient agreement has its own test above.
    """
    total = int(batch.completion_mask.sum())
    sft_loss(torch_backend.model, to_tensors(batch, torch_backend.device), total).backward()
    gradients = [(n, mx.array(p.grad.numpy())) for n, p in torch_backend.model.named_parameters()]
    mlx_backend.apply_gradients(tree_unflatten(gradients), 1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.01))
    torch_backend.optimizer_step(1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.01))
    expected = {n: p.detach().numpy() for n, p in torch_backend.model.named_parameters()}
    got = dict(tree_flatten(mlx_backend.model.parameters()))
    assert set(got) == set(expected)
    return max(np.abs(np.array(got[n]) - expected[n]).max() for n in got)


def test_parameters_after_one_adamw_step_match(trained_dir):
    torch_backend, mlx_backend = both(trained_dir)
    batch = sample_batch(torch_backend.tokenizer)
    assert adamw_step_from_torch_gradients(torch_backend, mlx_backend, batch) <= 1e-6
    # MLX's AdamW default (no bias correction) moves the weights differently
    torch_backend, uncorrected = both(trained_dir)
    uncorrected.optimizer = optim.AdamW(learning_rate=1e-3, betas=list(ADAM_BETAS), weight_decay=0.01)
    assert adamw_step_from_torch_gradients(torch_backend, uncorrected, batch) > 1e-4


def test_greedy_decoding_matches(trained_dir):
    torch_backend, mlx_backend = both(trained_dir, trainable=False)
    prompts = encode_prompts(torch_backend.tokenizer, generate_problems(20, seed=9, held_out=True))
    expected = torch_backend.generate(prompts, 32, temperature=0.0)
    assert min(len(row) for row in expected) == 32  # the comparison covers 32 tokens of every row
    assert mlx_backend.generate(prompts, 32, temperature=0.0) == expected
    break_rope(mlx_backend)
    assert mlx_backend.generate(prompts, 32, temperature=0.0) != expected


def test_mlx_groups_prefilled_once_and_finished_rows_dropped_decode_each_row_as_alone(trained_dir):
    from reasoning_mlx.generate import generate

    _, mlx_backend = both(trained_dir, trainable=False)
    tokenizer = mlx_backend.tokenizer
    prompts = encode_prompts(tokenizer, [Problem((7, 5)), Problem((23, 15, 8)), Problem((12, 34, 56, 78))])
    stops = {stop_where_rows_differ([generate(mlx_backend.model, [p], 80, 0.0, set(), PAD, 0)[0] for p in prompts])}
    batched = generate(mlx_backend.model, [p for p in prompts for _ in range(4)] + prompts[:1], 80, 0.0, stops,
                       PAD, 0)
    alone = [generate(mlx_backend.model, [p], 80, 0.0, stops, PAD, 0)[0] for p in prompts]
    assert batched == [row for row in alone for _ in range(4)] + alone[:1]
    assert len({len(row) for row in alone}) > 1  # rows finished at different steps, so some were dropped


def stop_where_rows_differ(rows: list[list[int]]) -> int:
    """The token that, as the stop, ends these greedy rows at the most different steps: chosen from what the
    model does emit, so the test does not depend on where a few training steps leave its end token."""
    def lengths(token: int) -> tuple[int, ...]:
        return tuple(row.index(token) + 1 if token in row else len(row) for row in rows)

    candidates = [token for token in set().union(*rows) if len(set(lengths(token))) > 1]
    assert candidates, f"no stop token ends these greedy rows at different steps: {rows}"
    return min(candidates, key=lambda token: (-len(set(lengths(token))), sum(lengths(token)), token))


@pytest.mark.slow  # a training run per backend
def test_whole_training_run_matches(tmp_path):
    """`train --mode full` on a tiny budget: the same SFT loss curve, the same evaluation within noise.

    (At this budget accuracy is still 0 on both; the full-preset runs in the README compare accuracy.)
    """
    from test_cli import run_cli

    budget = ["--model", "tiny", "--num-samples", "2048", "--grpo-samples", "8", "--prompts-per-step", "4",
              "--group-size", "4", "--eval-samples", "50", "--ood-samples", "4"]
    runs = {}
    for backend in ("torch", "mlx"):
        result = run_cli("train", "--backend", backend, *budget, "--output-dir", tmp_path / backend)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        runs[backend] = {"sft_loss": np.array([r["loss"] for r in rows if r["phase"] == "sft"]),
                         **{r["stage"]: r for r in rows if r["phase"] == "eval"}}
    torch_run, mlx_run = runs["torch"], runs["mlx"]
    assert len(torch_run["sft_loss"]) == 64 and torch_run["sft_loss"][-1] < 0.5 * torch_run["sft_loss"][0]
    # step for step at first; fp32 rounding differences then grow, as between any two fp32 runs
    np.testing.assert_allclose(mlx_run["sft_loss"][:32], torch_run["sft_loss"][:32], rtol=1e-3)
    assert mlx_run["sft_loss"][-8:].mean() == pytest.approx(torch_run["sft_loss"][-8:].mean(), rel=0.02)
    for stage in ("after_sft", "after_grpo"):
        for metric in ("accuracy", "format_compliance"):
            p = (torch_run[stage][metric] + mlx_run[stage][metric]) / 2
            assert abs(torch_run[stage][metric] - mlx_run[stage][metric]) <= 3 * np.sqrt(p * (1 - p) / 50) + 0.02
        assert mlx_run[stage]["mean_completion_tokens"] == pytest.approx(
            torch_run[stage]["mean_completion_tokens"], rel=0.15)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("backend_index", [0, 1], ids=["torch", "mlx"])
def test_rows_without_signal_can_be_left_out(trained_dir, variant, backend_index):
    """Training only the rows with a non-zero advantage, with the whole batch's normalisers, is the
    same step as training them all (each backend); the normalisers of the part alone are not."""
    settings = GRPOConfig(loss_variant=variant, max_new_tokens=64, max_grad_norm=1e9)
    advantages = np.array([1.0, 0.0, -0.5, 0.0, 0.0, 2.0, 0.0, -1.0], np.float32)

    def one_step(select_rows: bool, sampled_totals: bool = True) -> tuple[dict, np.ndarray]:
        backend = both(trained_dir)[backend_index]
        batch = sample_batch(backend.tokenizer)
        if not select_rows:
            return backend.grpo_step(GRPOBatch(batch, advantages, None, None), 1e-3, settings), embeddings(backend)
        keep = np.flatnonzero(advantages)
        totals = {"sampled_sequences": len(batch), "sampled_completion_tokens": int(batch.completion_mask.sum())}
        part = pack_batch([list(r[m == 1]) for r, m in zip(batch.input_ids[keep], batch.attention_mask[keep] -
                                                            batch.completion_mask[keep])],
                          [list(r[m == 1]) for r, m in zip(batch.input_ids[keep], batch.completion_mask[keep])], PAD)
        grpo_batch = GRPOBatch(part, advantages[keep], None, None, **(totals if sampled_totals else {}))
        return backend.grpo_step(grpo_batch, 1e-3, settings), embeddings(backend)

    def embeddings(backend) -> np.ndarray:
        if backend_index == 0:
            return backend.model.model.embed_tokens.weight.detach().numpy().copy()
        return np.array(backend.model.model.embed_tokens.weight)

    everything, selected, normalised_alone = one_step(False), one_step(True), one_step(True, sampled_totals=False)
    assert selected[0]["loss"] == pytest.approx(everything[0]["loss"], abs=1e-6)
    assert selected[0]["grad_norm"] == pytest.approx(everything[0]["grad_norm"], rel=1e-4)
    # Adam divides by the gradient's size, so a weight whose gradient is rounding noise (1e-12 either way)
    # may move by lr in either direction: a handful of such weights are allowed
    assert np.mean(np.abs(selected[1] - everything[1]) > 1e-6) < 1e-4
    assert normalised_alone[0]["grad_norm"] > 1.1 * everything[0]["grad_norm"]


@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_both_samplers_stop_on_probabilities_that_are_not_finite(tiny_model_dir, tmp_path, poison):
    """Diverged weights give NaN or inf logits: sampling from them is one DivergedError on either backend
    (greedy decoding is left alone), never tokens drawn from NaN."""
    import shutil

    from safetensors.numpy import load_file, save_file
    from shared.runtime.errors import SAMPLING_NOT_FINITE, DivergedError

    folder = shutil.copytree(tiny_model_dir, tmp_path / "poisoned")
    tensors = load_file(str(folder / "model.safetensors"))
    norm = next(name for name in tensors if name.endswith("model.norm.weight"))
    tensors[norm] = np.full_like(tensors[norm], poison)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    prompts = encode_prompts(both(tiny_model_dir, trainable=False)[0].tokenizer, [Problem((1, 2, 3))] * 2)
    for backend in both(folder, trainable=False):
        with pytest.raises(DivergedError, match=f"^{SAMPLING_NOT_FINITE}$"):
            backend.generate(prompts, 4, temperature=1.0, seed=0)
        assert len(backend.generate(prompts, 4, temperature=0.0)) == 2, backend.name
