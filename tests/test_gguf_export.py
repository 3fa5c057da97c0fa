"""GGUF export: files that our import, transformers' own GGUF reader and (where installed) llama.cpp read
back as the model that was exported, with its tokenizer, chat template and an Ollama Modelfile."""
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

pytest.importorskip("gguf")
from shared.checkpoints.conversion import read_model_weights  # noqa: E402
from shared.models.gguf_import import import_gguf  # noqa: E402
from shared.models.prompts import load_tokenizer, prompt_texts  # noqa: E402
from shared.tasks.registry import load_task  # noqa: E402
from shared.training.config import TaskConfig  # noqa: E402
from test_cli import run_cli  # noqa: E402
from test_conversion import mlx_checkpoint, peft_checkpoint, quantized_dir  # noqa: E402,F401 (fixtures)

TINY_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir, tmp_path_factory):
    """A random Llama with the tiny model's vocabulary, its tokenizer split as SmolLM2's imported one
    (GPT-2's byte-level regex), so the export's q/k row order and 'gpt-2' pre-tokenizer are both tested."""
    folder = tmp_path_factory.mktemp("llama") / "llama"
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TINY_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = None
    tokenizer["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"  # Qwen2Tokenizer would impose Qwen2's own split
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tiny_model_dir, llama_dir):
    return tiny_model_dir if request.param == "qwen2" else llama_dir


def export(source, output, *extra):
    result = run_cli("convert", source, "--to", "gguf", "--output", output, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{output} (" in result.stdout
    return output


def imported(gguf_file, tmp_path):
    folder = tmp_path / f"{gguf_file.stem}-imported"
    folder.mkdir()
    import_gguf(gguf_file, folder)
    return folder


def weights(folder) -> dict[str, np.ndarray]:
    tensors, _ = read_model_weights(folder)
    return {name: t.as_float32() for name, t in tensors.items() if name != "lm_head.weight"}


def prompts(count=4):
    task = load_task(TaskConfig())
    return task.held_out(count, seed=0)


def logits(folder, text) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0].numpy()


def test_export_then_import_gives_back_the_weights(model_dir, tmp_path):
    expected = weights(model_dir)
    files = {dtype: export(model_dir, tmp_path / f"model-{dtype}.gguf", "--dtype", dtype)
             for dtype in ("f32", "f16", "q8_0")}
    exact_folder = imported(files["f32"], tmp_path)
    exact = weights(exact_folder)
    assert exact.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(exact[name], array, err_msg=name)
    half = weights(imported(files["f16"], tmp_path))
    eight_bit = weights(imported(files["q8_0"], tmp_path))
    for name, array in expected.items():
        if array.ndim == 1:  # norms and biases stay f32, as llama.cpp keeps them
            np.testing.assert_array_equal(half[name], array)
            np.testing.assert_array_equal(eight_bit[name], array)
            continue
        np.testing.assert_array_equal(half[name], array.astype(np.float16).astype(np.float32), err_msg=name)
        # q8_0: each block of 32 values is scaled by its largest / 127 (kept in f16, 127 x 2^-11 off at most)
        # and rounded
        scale = np.abs(array.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        error = np.abs(eight_bit[name] - array).reshape(-1, 32)
        assert (error <= scale * (0.5 + 127 * 2**-11) + 1e-7).all(), name
        assert error.max() > 0, name  # it was quantized
    assert files["q8_0"].stat().st_size < 0.6 * files["f16"].stat().st_size
    text = prompt_texts(load_tokenizer(model_dir), prompts(1))[0] + "<think>\nStep 1:"
    np.testing.assert_allclose(logits(exact_folder, text), logits(model_dir, text), atol=1e-5)


def test_an_untied_output_layer_is_written_as_its_own_tensor(tiny_model_dir, tmp_path):
    """Qwen2.5 from 1.5B up keeps lm_head apart from the embeddings."""
    folder = tmp_path / "untied"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), tie_word_embeddings=False)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    model.save_pretrained(folder)
    for name in TINY_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    back = imported(export(folder, tmp_path / "untied.gguf", "--dtype", "f32"), tmp_path)
    expected, _ = read_model_weights(folder)
    got, _ = read_model_weights(back)
    np.testing.assert_array_equal(got["lm_head.weight"].as_float32(), expected["lm_head.weight"].as_float32())
    assert not np.array_equal(got["lm_head.weight"].as_float32(), got["model.embed_tokens.weight"].as_float32())


def test_a_wrong_rotary_row_order_would_be_caught(llama_dir, tmp_path, monkeypatch):
    import shared.models.gguf_export as gguf_export

    monkeypatch.setattr(gguf_export, "permute_rotary", lambda weight, heads: weight)
    broken = imported(gguf_export.export_gguf(llama_dir, tmp_path / "broken.gguf", "f32").path, tmp_path)
    text = prompt_texts(load_tokenizer(llama_dir), prompts(1))[0]
    assert np.abs(logits(broken, text) - logits(llama_dir, text)).max() > 1e-3


def test_the_files_tokenizer_encodes_prompts_as_the_models_own(model_dir, tmp_path):
    """transformers' GGUF tokenizer reader, no code of ours, rebuilds the tokenizer from the file."""
    gguf_file = export(model_dir, tmp_path / "model.gguf", "--dtype", "f32")
    from_file = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_file.name)
    own = load_tokenizer(model_dir)
    texts = [t + p.completion for t, p in zip(prompt_texts(own, prompts()), prompts())]
    for text in texts:
        expected = own(text, add_special_tokens=False)["input_ids"]
        assert from_file(text, add_special_tokens=False)["input_ids"] == expected
    assert from_file.eos_token == "<|im_end|>"
    assert from_file.chat_template == own.chat_template


def test_adapters_of_either_backend_are_merged_into_their_base(tiny_model_dir, peft_checkpoint, mlx_checkpoint,
                                                             tmp_path):
    ids_text = prompt_texts(load_tokenizer(tiny_model_dir), prompts(1))[0]
    for name, adapter in (("peft", peft_checkpoint), ("mlx", mlx_checkpoint)):
        folder = imported(export(adapter, tmp_path / f"{name}.gguf", "--dtype", "f32"), tmp_path)
        merged = logits(folder, ids_text)
        tokenizer = load_tokenizer(tiny_model_dir)
        ids = tokenizer(ids_text, add_special_tokens=False)["input_ids"]
        if name == "peft":
            from peft import PeftModel
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        else:
            import mlx.core as mx
            import mlx_lm
            model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapter))
            expected = np.array(model(mx.array([ids]))[0])
        assert np.abs(merged - expected).max() <= 1e-4, name
        assert np.abs(merged - logits(tiny_model_dir, ids_text)).max() > 1e-3, name  # the adapter changed something


def test_a_qlora_adapter_is_merged_into_its_dequantized_base(quantized_dir, tmp_path):
    import mlx.core as mx
    import mlx_lm
    from test_conversion import random_mlx_adapter

    adapter = random_mlx_adapter(quantized_dir, tmp_path / "qlora", seed=2)
    folder = imported(export(adapter, tmp_path / "qlora.gguf", "--dtype", "f32"), tmp_path)
    ids = load_tokenizer(folder)("Calculate 23 + 15 + 8", add_special_tokens=False)["input_ids"]
    model, _ = mlx_lm.load(str(quantized_dir), adapter_path=str(adapter))
    expected = np.array(model(mx.array([ids]))[0])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_a_full_mlx_checkpoint_exports_as_the_model_it_holds(tiny_model_dir, tmp_path):
    """What the demo writes on a Mac: the tiny model fully fine-tuned by the MLX backend."""
    from reasoning_mlx.backend import MLXBackend
    from shared.checkpoints.folders import save_checkpoint
    from shared.training.config import ModelConfig

    backend = MLXBackend()
    backend.load(tiny_model_dir, ModelConfig(name="tiny", finetune="full"), trainable=True)
    checkpoint = save_checkpoint(backend, tmp_path / "mlx_full", "{}")
    folder = imported(export(checkpoint, tmp_path / "mlx_full.gguf", "--dtype", "f32"), tmp_path)
    expected = weights(tiny_model_dir)
    assert weights(folder).keys() == expected.keys()
    for name, array in weights(folder).items():
        np.testing.assert_allclose(array, expected[name], atol=1e-6, err_msg=name)


def test_a_quantized_mlx_model_is_dequantized(quantized_dir, tmp_path):
    folder = imported(export(quantized_dir, tmp_path / "quantized.gguf", "--dtype", "f32"), tmp_path)
    ids = np.array([load_tokenizer(folder)("Calculate 23 + 15 + 8", add_special_tokens=False)["input_ids"]])
    import mlx.core as mx
    import mlx_lm
    model, _ = mlx_lm.load(str(quantized_dir))
    expected = np.array(model(mx.array(ids)))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_the_modelfile_names_the_file_the_prompt_format_and_the_stop_token(model_dir, tmp_path):
    export(model_dir, tmp_path / "mine.gguf")
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./mine.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    problem = prompts(1)[0]
    prompt, response = template.split("{{ .Response }}")
    assert prompt.replace("{{ .Prompt }}", problem.prompt) == prompt_texts(load_tokenizer(model_dir), [problem])[0]
    assert response == "<|im_end|>\n"  # an earlier turn's answer is closed as the template closes it


def test_what_cannot_be_exported_is_one_line_and_no_file(tiny_model_dir, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    (tmp_path / "taken.gguf").write_bytes(b"a finished file")
    cases = {
        "architecture": ([gpt2, "--output", tmp_path / "gpt2.gguf"],
                         "GPT2LMHeadModel cannot be exported to GGUF (supported: LlamaForCausalLM, Qwen2ForCausalLM)"),
        "unwritable": ([tiny_model_dir, "--output", "/proc/model.gguf"], "cannot be written"),
        "dtype": ([tiny_model_dir, "--output", tmp_path / "q4.gguf", "--dtype", "q4_k"], "Invalid value for '--dtype'"),
        "exists": ([tiny_model_dir, "--output", tmp_path / "taken.gguf"], "already exists"),
        "suffix": ([tiny_model_dir, "--output", tmp_path / "model.bin"], "with a .gguf suffix"),
    }
    for name, (args, message) in cases.items():
        result = run_cli("convert", args[0], "--to", "gguf", *args[1:])
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "taken.gguf"]
    assert (tmp_path / "taken.gguf").read_bytes() == b"a finished file"
    # a run that would end in a GGUF file llama.cpp cannot read stops before it trains
    result = run_cli("train", "--model", gpt2, "--finetune", "full", "--backend", "torch", "--export-gguf",
                     "--output-dir", tmp_path / "run")
    assert result.returncode == 2 and "GPT2LMHeadModel cannot be exported to GGUF" in result.stderr
    assert not (tmp_path / "run").exists()


# ---- llama.cpp itself ---------------------------------------------------------------------------

def greedy_transformers(folder, text, tokens) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=[], pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_llama_cpp_reads_the_file_as_transformers_reads_the_folder(model_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (pip install llama-cpp-python)")
    gguf_file = export(model_dir, tmp_path / "model.gguf", "--dtype", "f32")
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=512, logits_all=True, verbose=False, seed=0)
    tokenizer = load_tokenizer(model_dir)
    problems = prompts()
    for text in (t + p.completion for t, p in zip(prompt_texts(tokenizer, problems), problems)):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tokenizer(text, add_special_tokens=False)["input_ids"]
    text = prompt_texts(tokenizer, problems[:1])[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm.reset()
    llm.eval(ids)
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)]), logits(model_dir, text), atol=2e-3)
    generated = []
    llm.reset()
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if len(generated) == 12:
            break
        generated.append(token)
    assert generated == greedy_transformers(model_dir, text, 12)[:len(generated)] and generated
    # its chat template, rendered by llama.cpp's Python binding, is the prompt the model was trained on
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="")
    prompt = formatter(messages=[{"role": "user", "content": problems[0].prompt}]).prompt
    assert prompt == text


def test_a_template_that_cannot_be_cut_around_the_message_leaves_ollama_the_files_own():
    from shared.models.gguf_export import GgufTokenizer, modelfile_text

    tokenizer = GgufTokenizer(tokens=["<|endoftext|>", "<|im_end|>"], token_types=[3, 3], merges=[], pre="gpt-2",
                              chat_template="{{ messages[0]['content'] | upper }}", eos_id=0, end_of_turn_id=1)
    text = modelfile_text("m.gguf", tokenizer)
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "FROM ./m.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
