"""The lean sampling decoder computes what transformers' Qwen2 and Llama compute: logits, LoRA, sampled tokens."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from shared.algorithms.padding import left_pad
from reasoning_torch.decoder import LeanDecoder, supports
from reasoning_torch.generate import TransformersForward, generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # unequal: left padding on two rows
STOPS = {3}
ARCHITECTURES = pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_llama_dir"])  # Qwen2, Llama


def load(folder):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def with_lora(model):
    """LoRA on every projection with random B: adapters that change the output."""
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config).eval()


def logits_along(make_forward, steps: int = 6, padding_override=None) -> list[torch.Tensor]:
    """Prefill, then feed each row's greedy token `steps` times; the logits of every call.
    `make_forward(padding)` builds the forward from each row's count of left padding."""
    ids, mask = (torch.from_numpy(a) for a in left_pad(PROMPTS, 0))
    padding = (mask == 0).sum(1)
    forward = make_forward(padding if padding_override is None else padding_override(padding))
    outputs = [forward(ids)]
    forward.commit()
    for _ in range(steps):
        outputs.append(forward(outputs[-1].argmax(-1)[:, None]))
        forward.commit()
    return outputs


def lean(model, capacity: int = 13):
    return lambda padding: LeanDecoder(model, padding, capacity)


def plain(model):
    return lambda padding: TransformersForward(model, padding, 0)


@ARCHITECTURES
@torch.no_grad()
def test_logits_match_transformers_through_prefill_and_decoding(model_dir, request):
    model = load(request.getfixturevalue(model_dir))
    assert supports(model)
    reference = logits_along(plain(model))
    for ours, theirs in zip(logits_along(lean(model)), reference):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # attending to the padding moves the padded rows' logits: the comparison can tell
    broken = logits_along(lean(model), padding_override=torch.zeros_like)
    assert (broken[0][1] - reference[0][1]).abs().max() > 1e-3


@ARCHITECTURES
@torch.no_grad()
def test_rows_keeping_different_numbers_of_tokens_decode_each_as_alone(model_dir, request):
    """Speculative decoding runs a few tokens per row and keeps a different number of them per row:
    each row's logits then equal those of the row decoded alone, one token at a time."""
    model = load(request.getfixturevalue(model_dir))
    ids, mask = (torch.from_numpy(a) for a in left_pad(PROMPTS, 0))
    decoder = LeanDecoder(model, (mask == 0).sum(1), 7 + 8)
    decoder(ids)
    decoder.commit()
    block = torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28]])
    kept = torch.tensor([1, 3, 2])
    block_logits = decoder(block, every_position=True)
    decoder.commit(kept)
    following = torch.tensor([[30], [31], [32]])
    next_logits = decoder(following)
    for row, prompt in enumerate(PROMPTS):
        alone = TransformersForward(model, torch.zeros(1, dtype=torch.long), 0)
        alone(torch.tensor([prompt]))
        for column in range(int(kept[row])):
            torch.testing.assert_close(alone(block[row:row + 1, column:column + 1])[0], block_logits[row, column],
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone(following[row:row + 1])[0], next_logits[row], atol=1e-5, rtol=1e-5)
    # keeping all three tokens of every row instead reads the rejected ones: the comparison can tell
    wrong = LeanDecoder(model, (mask == 0).sum(1), 7 + 8)
    wrong(ids)
    wrong.commit()
    wrong(block, every_position=True)
    wrong.commit()
    assert (wrong(following)[0] - next_logits[0]).abs().max() > 1e-3


@ARCHITECTURES
@torch.no_grad()
def test_active_lora_adapters_are_merged_and_disabled_ones_are_not(model_dir, request):
    model = with_lora(load(request.getfixturevalue(model_dir)))
    reference = logits_along(plain(model))
    for ours, theirs in zip(logits_along(lean(model)), reference):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        base = logits_along(plain(model))
        for ours, theirs in zip(logits_along(lean(model)), base):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (base[0] - reference[0]).abs().max() > 1e-2  # the adapters matter, so the merge was tested


@ARCHITECTURES
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_gives_the_same_tokens_on_both_paths(model_dir, temperature, request):
    model = with_lora(load(request.getfixturevalue(model_dir)))
    rows = [generate(model, PROMPTS * 4, 40, temperature, STOPS, 0, 7, lean=lean)
            for lean in (True, False)]
    assert rows[0] == rows[1]
    assert sum(len(row) for row in rows[0]) > len(rows[0])  # something was generated


def test_other_architectures_sample_through_their_own_forward():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, mlp_bias=True)  # a bias the decoder lacks
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert not supports(model)
    rows = generate(model, PROMPTS, 8, 1.0, STOPS, 0, 0)
    assert len(rows) == len(PROMPTS) and all(1 <= len(row) <= 8 for row in rows)
