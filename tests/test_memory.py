"""Memory: gradient checkpointing and chunked log-probs compute what the plain paths compute (and the
comparisons catch a deliberate mistake), each backend measures its peak, and problems past --max-seq-len
are an error naming them or, with truncate, are cut from the left."""
import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from shared.models.prompts import encode_prompts, encode_targets, load_tokenizer
from shared.runtime.errors import UsageError
from shared.runtime.memory import check_training_fits, parameter_count, training_step_bytes
from shared.tasks.addition.data import Problem
from shared.tasks.file_task import read_examples
from shared.training.backend import GRPOBatch
from shared.training.config import GRPOConfig, RunConfig, SFTConfig
from shared.training.problem_sets import SequenceLimit, fit_problems
import reasoning_mlx.model
import reasoning_torch.losses
from reasoning_torch.losses import decoder_parts, picked_logprobs

from tests.test_shared_prefix import FULL, LORA, captured_gradients, gradients_of_a_step, make_backend, sampled_batch


def step_with_and_without_recomputation(backend_name: str, folder, model, step: str):
    """(stats, gradients) of one GRPO or SFT step from the same weights and batch, plain then with gradient
    checkpointing."""
    results = []
    for recompute in (False, True):
        backend = make_backend(backend_name, folder, dataclasses.replace(model, gradient_checkpointing=recompute))
        tokens = sampled_batch(backend)
        if step == "grpo":
            advantages = np.random.default_rng(1).normal(size=len(tokens)).astype(np.float32)
            results.append(gradients_of_a_step(backend, GRPOBatch(tokens, advantages, None, None),
                                               GRPOConfig(max_new_tokens=30, temperature=0.9)))
        else:
            results.append(sft_gradients(backend, tokens))
    return results


def sft_gradients(backend, tokens):
    captured = captured_gradients(backend)
    return backend.sft_step(tokens, 1e-3, SFTConfig()), captured


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@pytest.mark.parametrize("model", [FULL, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("step", ["sft", "grpo"])
def test_gradient_checkpointing_gives_the_plain_step(tiny_model_dir, backend_name, model, step):
    (plain, plain_grads), (recomputed, recomputed_grads) = step_with_and_without_recomputation(
        backend_name, tiny_model_dir, model, step)
    assert recomputed["loss"] == pytest.approx(plain["loss"], abs=1e-4) and plain["loss"] != 0
    assert plain_grads.keys() == recomputed_grads.keys() and plain_grads
    for name, expected in plain_grads.items():
        scale = max(float(np.abs(expected).max()), 1e-8)
        np.testing.assert_allclose(recomputed_grads[name] / scale, expected / scale, atol=1e-4, err_msg=name)


def test_the_comparison_catches_a_layer_recomputed_without_its_weights(tiny_model_dir, monkeypatch):
    """The mistake to avoid in MLX: a checkpointed layer that reads its weights from the closure rather than
    from mx.checkpoint's arguments gets no gradient for them."""
    def forgetful(layer_class):
        def __call__(self, x, mask=None, cache=None):
            if cache is not None:
                return layer_class.__call__(self, x, mask, cache)
            return mx.checkpoint(lambda x: layer_class.__call__(self, x, mask))(x)
        return type(f"Forgetful{layer_class.__name__}", (layer_class,), {"__call__": __call__})

    monkeypatch.setattr(reasoning_mlx.model, "recomputed", forgetful)
    (_, plain), (_, recomputed) = step_with_and_without_recomputation("mlx", tiny_model_dir, FULL, "sft")
    layer_weights = [name for name in plain if name.startswith("model.layers.")]
    assert layer_weights and all(not recomputed[name].any() for name in layer_weights)


def test_transformers_recomputation_drops_the_prefix_pass_cache(tiny_model_dir):
    """Why the PyTorch backend takes the per-row path under gradient checkpointing: with gradients on, transformers
    drops the KV cache of a layer it may recompute, so the shared-prefix pass would train on completions without
    their prompt."""
    backend = make_backend("torch", tiny_model_dir, dataclasses.replace(FULL, gradient_checkpointing=True))
    tokens = sampled_batch(backend)
    batch = GRPOBatch(tokens, np.random.default_rng(1).normal(size=len(tokens)).astype(np.float32), None, None)
    _, right = gradients_of_a_step(backend, batch, GRPOConfig(max_new_tokens=30))
    backend.recomputes = False  # the mistake: the prefix pass under recomputation
    _, wrong = gradients_of_a_step(backend, batch, GRPOConfig(max_new_tokens=30))
    difference = max(float(np.abs(wrong[name] - right[name]).max() / np.abs(right[name]).max()) for name in right)
    assert difference > 1e-2


def test_chunked_logprobs_equal_the_full_log_softmax_and_its_gradient(tiny_model_dir, monkeypatch):
    backend = make_backend("torch", tiny_model_dir, FULL)
    body, head = decoder_parts(backend.model)
    ids = torch.randint(0, backend.model.config.vocab_size, (3, 17))
    hidden = body(input_ids=ids).last_hidden_state.detach().requires_grad_()
    targets = torch.randint(0, backend.model.config.vocab_size, (3, 17))
    full = torch.log_softmax(head(hidden).float() / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
    expected_grad, = torch.autograd.grad(full.sum(), hidden)
    monkeypatch.setattr(reasoning_torch.losses, "LOGITS_PER_CHUNK", 5 * head.weight.shape[0])  # chunks of 5 positions
    chunked = picked_logprobs(head, hidden, targets, 0.7)
    grad, = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)
    shifted = picked_logprobs(head, hidden, targets.roll(1, dims=1), 0.7)  # a target off by one: caught
    assert (shifted - full).abs().max() > 1e-2


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_each_backend_measures_its_peak_from_the_last_reset(tiny_model_dir, backend_name):
    backend = make_backend(backend_name, tiny_model_dir, FULL)
    backend.reset_peak_memory()
    before = backend.peak_memory()
    if backend_name == "torch":
        held = torch.ones(2**28 // 4).add_(1)  # 256 MB, touched
    else:
        held = mx.ones(2**28 // 4) + 1
        mx.eval(held)
    holding = backend.peak_memory()
    assert holding - before >= 240 * 2**20
    del held
    backend.reset_peak_memory()
    assert backend.peak_memory() < holding - 200 * 2**20  # the peak counts again from the reset


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def long_examples(tmp_path, lengths: list[int]):
    lines = [{"prompt": " ".join(["word"] * n) + f" end{i}", "answer": i, "completion": f"<think>{i}</think>\n{i}"}
             for i, n in enumerate(lengths)]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return read_examples(path)


def test_a_problem_past_the_limit_is_named_with_its_length(tokenizer, tmp_path):
    examples = long_examples(tmp_path, [3, 400, 5, 900])
    limit = SequenceLimit(300, given=True)
    with pytest.raises(UsageError) as error:
        fit_problems(tokenizer, examples, "SFT", None, limit, truncate=False)
    length = len(encode_prompts(tokenizer, examples[1:2])[0]) + len(encode_targets(tokenizer, examples[1:2])[0])
    assert str(error.value).startswith(f"line 2 of {tmp_path / 'task.jsonl'} is {length:,} tokens (prompt ")
    assert "more than --max-seq-len 300 for SFT; 1 more SFT problems too: --truncate" in str(error.value)
    fitting = examples[::2]
    longest = max(len(prompt) + len(target) for prompt, target in
                  zip(encode_prompts(tokenizer, fitting), encode_targets(tokenizer, fitting)))
    assert fit_problems(tokenizer, fitting, "SFT", None, limit, truncate=False) == (fitting, longest)


@pytest.mark.parametrize("room", [None, ("--max-new-tokens", 50)])
def test_truncate_keeps_the_end_of_a_prompt_and_everything_else(tokenizer, tmp_path, room):
    examples = long_examples(tmp_path, [3, 400, 900])
    fitted, longest = fit_problems(tokenizer, examples, "SFT", room, SequenceLimit(120, given=True), truncate=True)
    assert longest == 120
    assert fitted[0] is examples[0]
    for cut, original in zip(fitted[1:], examples[1:]):
        completion = room[1] if room else len(encode_targets(tokenizer, [cut])[0])
        assert len(encode_prompts(tokenizer, [cut])[0]) + completion <= 120
        assert len(encode_prompts(tokenizer, [cut])[0]) + completion >= 115  # cut no more than it must
        assert original.prompt.endswith(cut.prompt.strip()) and cut.prompt.endswith(f" end{original.answer}")
        assert (cut.answer, cut.completion, cut.where(), cut.fields()) == \
            (original.answer, original.completion, original.where(), original.fields())


def test_room_that_leaves_no_prompt_says_which_flag(tokenizer):
    problems = [Problem((23, 15, 8))]
    with pytest.raises(UsageError, match=r"^--max-new-tokens 600 runs past --max-seq-len 512 for GRPO \(prompts take "
                                         r"up to \d+\): at most \d+$"):
        fit_problems(tokenizer, problems, "GRPO", ("--max-new-tokens", 600), SequenceLimit(512, True), truncate=False)
    with pytest.raises(UsageError, match="--max-new-tokens 600 alone leaves no room for the prompt"):
        fit_problems(tokenizer, problems, "GRPO", ("--max-new-tokens", 600), SequenceLimit(512, True), truncate=True)


def test_runs_from_before_these_settings_read_back():
    saved = json.loads(RunConfig().to_json())
    for name in ("max_seq_len", "truncate"):
        del saved[name]
    del saved["model"]["gradient_checkpointing"]
    config = RunConfig.from_json(json.dumps(saved))
    assert (config.max_seq_len, config.truncate, config.model.gradient_checkpointing) == (None, False, False)


SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}


def test_the_parameter_count_is_the_models_matrices(tiny_model_dir):
    """Every weight matrix counted; norms and biases (0.2 % of the tiny model, less of larger ones) are not."""
    counted = parameter_count(json.loads((tiny_model_dir / "config.json").read_text()))
    assert counted == pytest.approx(sum(p.numel() for p in torch_model(tiny_model_dir).parameters()), rel=3e-3)
    assert parameter_count(SMOLLM2) == 134_515_008 - 61 * 576  # SmolLM2-135M less its 61 norms


def torch_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder)


def test_a_step_past_the_memory_free_names_the_flags_that_fit():
    step = {"GRPO": (32, 202)}
    plain, recomputed = (training_step_bytes(SMOLLM2, False, 32, 202, r) for r in (False, True))
    assert recomputed < plain / 3  # checkpointing keeps each layer's input, not its activations
    check_training_fits(SMOLLM2, False, False, step, available=int(plain * 1.01))  # fits: nothing said
    with pytest.raises(UsageError, match=r"^a GRPO step needs about \d+\.\d GB \(32 sequences of up to 202 tokens a "
                                         r"pass\), more than the \d+\.\d GB free here: --gradient-checkpointing would "
                                         r"fit$"):
        check_training_fits(SMOLLM2, False, False, step, available=int(plain * 0.9))
    with pytest.raises(UsageError, match=r"--gradient-checkpointing --micro-batch-size (\d+) would fit$") as error:
        check_training_fits(SMOLLM2, False, False, step, available=training_step_bytes(SMOLLM2, False, 8, 202, True))
    assert error.match("--micro-batch-size 8 would")
    with pytest.raises(UsageError, match=r"--micro-batch-size 1 --max-seq-len \d+ --truncate would fit$"):
        check_training_fits(SMOLLM2, False, True, {"SFT": (4, 8000)}, available=4 * 2**30)
