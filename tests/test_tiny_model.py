import json
import os
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

import numpy as np
import pytest
from safetensors.numpy import load_file

from shared.models.prompts import prompt_ids, target_ids
from shared.models.tiny_model import TinyModelSpec, model_weights, write_tiny_model
from shared.tasks.addition.data import Problem, reasoning_target

ROOT = Path(__file__).resolve().parents[1]


def test_weights_are_deterministic_in_the_seed():
    first, again = model_weights(TinyModelSpec()), model_weights(TinyModelSpec())
    other = model_weights(TinyModelSpec(seed=1))
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_folder_has_the_hugging_face_layout(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sum(w.size for w in weights.values()) < 5_000_000
    assert "lm_head.weight" not in weights  # tied to the embedding
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tiny_model_dir / name).exists()


def test_tokenizer_reloads_through_autotokenizer_byte_for_byte(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for text in (reasoning_target(Problem((23, 15, 8))), "Calculate 1 + 22 + 333\n\n", "wörld  💡 x\t y"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text).ids  # transformers' Qwen2Tokenizer keeps the training pipeline
        assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("12 + 345 = 357\n", add_special_tokens=False))
    assert tokens == ["1", "2", "Ġ+", "Ġ", "3", "4", "5", "Ġ=", "Ġ", "3", "5", "7", "Ċ"]  # digits never merge
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"


def test_merges_shorten_the_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    problem = Problem((23, 15, 8))
    ids = prompt_ids(tokenizer, problem) + target_ids(tokenizer, problem)
    assert len(ids) < 0.5 * len(tokenizer.decode(ids))
    assert "ĠVerification" in tokenizer.get_vocab()


def test_chat_template_is_qwen_style(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    problem = Problem((23, 15, 8))
    rendered = tokenizer.decode(prompt_ids(tokenizer, problem))
    assert rendered == "<|im_start|>user\nCalculate 23 + 15 + 8<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_ids(tokenizer, problem)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert target_ids(tokenizer, problem)[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_model_loads_in_plain_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 384) and torch.isfinite(logits).all()
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_rewriting_replaces_the_folder_atomically(tmp_path):
    folder = write_tiny_model(tmp_path / "m", TinyModelSpec(seed=3))
    before = (folder / "model.safetensors").read_bytes()
    write_tiny_model(folder, TinyModelSpec(seed=4))
    assert (folder / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folders left behind


def test_processes_started_together_on_a_fresh_cache_all_get_the_model(tmp_path):
    """torchrun ranks resolve --model tiny at the same moment: without the cache lock each built its own
    copy, and one of two such processes once failed renaming it over the other's (OSError: Directory not empty)."""
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from shared.models.tiny_model import ensure_tiny_model; print(ensure_tiny_model())")
    env = {**os.environ, "LOCAL_REASONING_CACHE": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in processes]
    assert [status for _, _, status in results] == [0] * 8, [err[-300:] for _, err, _ in results]
    folders = {out.strip() for out, _, _ in results}
    assert len(folders) == 1
    assert sum("building the tiny model" in err for _, err, _ in results) == 1  # the others waited and reused it
    assert load_file(str(next(iter(folders)) + "/model.safetensors"))["model.embed_tokens.weight"].shape[0] == 384
