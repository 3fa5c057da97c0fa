"""Checkpoints written as GGUF files (llama.cpp's format) for llama.cpp, Ollama and LM Studio, with an
Ollama Modelfile beside them.

Adapters are merged into their base (a quantized mlx base dequantized first) with numpy, as `convert
--merge` does; weights, hyper-parameters, tokenizer and chat template are written with the `gguf`
package under llama.cpp's names and conventions. No framework is imported.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from shared.checkpoints.conversion import (SHORT_DTYPE_NAMES, ConversionRequest, convert_checkpoint, read_model_weights,
                                           resolve_base)
from shared.checkpoints.folders import check_can_write, write_atomically
from shared.checkpoints.layouts import detect_layout, read_json
from shared.checkpoints.lora_files import read_adapter
from shared.models.gguf_import import BLOCK_TENSORS, INSTALL_GGUF, TOP_LEVEL_TENSORS
from shared.models.tiny_model import CHAT_TEMPLATE
from shared.runtime.errors import UsageError, UserError

GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_DTYPES = ("f16", "bf16", "f32", "q8_0")
# the import's tables the other way round: Hugging Face names to llama.cpp's
GGUF_TOP_LEVEL_NAMES = {hf: gguf for gguf, hf in TOP_LEVEL_TENSORS.items()}
GGUF_BLOCK_NAMES = {hf: gguf for gguf, hf in BLOCK_TENSORS.items()}
END_OF_TURN = "<|im_end|>"
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name: ours, recognised
# from tokenizer.json, so llama.cpp splits digits exactly as the tokenizer the model was trained with
GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass
class GgufTokenizer:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    chat_template: str
    eos_id: int
    end_of_turn_id: int
    bos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False

    def token(self, token_id: int) -> str:
        return self.tokens[token_id]


@dataclass
class GgufExport:
    path: Path
    modelfile: Path
    architecture: str
    dtype: str
    tensors: int
    size_bytes: int

    def summary(self) -> str:
        return (f"{self.path} ({self.architecture}, {self.dtype}, {self.size_bytes / 2**20:.1f} MiB) and "
                f"{self.modelfile}: llama-cli -m {self.path} -cnv --jinja, or ollama create NAME -f {self.modelfile}")


def gguf_dtype(name: str | None) -> str:
    """--dtype for a GGUF file: f16 unless asked, the frameworks' names accepted too."""
    return SHORT_DTYPE_NAMES.get(name, name) if name else "f16"


# ---- what can be exported -------------------------------------------------------------------------

def gguf_architecture(config: dict, where: Path) -> str:
    """llama.cpp's name for the model's architecture, or a one-line error naming what is supported."""
    declared = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if declared not in GGUF_ARCHITECTURES:
        raise UsageError(f"{where}: {declared} cannot be exported to GGUF "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default" or config.get("hidden_act", "silu") != "silu":
        raise UsageError(f"{where}: rope scaling and activations other than silu cannot be exported to GGUF")
    return GGUF_ARCHITECTURES[declared]


def source_folders(checkpoint: Path, base: Path | None) -> list[Path]:
    """The checkpoint, and for an adapter the base model it applies to."""
    layout = detect_layout(checkpoint)
    if layout in ("peft", "mlx_lora"):
        return [checkpoint, resolve_base(read_adapter(checkpoint, layout), checkpoint, base)]
    return [checkpoint]


def source_config(folders: list[Path]) -> dict:
    """The model's config.json: a full checkpoint's own, an adapter's base's."""
    return read_json(folders[-1] / "config.json")


def source_tokenizer(folders: list[Path], config: dict) -> GgufTokenizer:
    """The tokenizer the model trained with: the checkpoint's copy, else its base's."""
    folder = next((f for f in folders if (f / "tokenizer.json").is_file()), folders[0])
    return read_tokenizer(folder, int(config["vocab_size"]))


@contextmanager
def full_model_folder(checkpoint: Path, base: Path | None):
    """A folder of full, unquantized weights in Hugging Face names: the checkpoint itself, or a merged
    (adapters) or dequantized (quantized mlx) copy that lives for the block."""
    layout = detect_layout(checkpoint)
    if layout == "full" and base is None:
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="local-reasoning-gguf-") as folder:
        merge = layout in ("peft", "mlx_lora")
        convert_checkpoint(ConversionRequest(checkpoint, "torch", merge=merge, base=base), Path(folder))
        yield Path(folder)


# ---- weights ------------------------------------------------------------------------------------

def gguf_tensor_name(hf_name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; None where llama.cpp has no place."""
    if hf_name in GGUF_TOP_LEVEL_NAMES:
        return GGUF_TOP_LEVEL_NAMES[hf_name]
    parts = hf_name.split(".")
    module, kind = ".".join(parts[3:-1]), parts[-1]
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and module in GGUF_BLOCK_NAMES \
            and kind in ("weight", "bias"):
        return f"blk.{parts[2]}.{GGUF_BLOCK_NAMES[module]}.{kind}"
    return None


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama: its rotary pairs adjacent dimensions, Hugging Face pairs halves."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def storage_type(array: np.ndarray, dtype: str):
    """As llama.cpp stores them: 1-D tensors (norms, biases) in f32; q8_0 where rows split into its
    32-value blocks, else f16."""
    from gguf import GGMLQuantizationType as Type

    if array.ndim == 1 or dtype == "f32":
        return Type.F32
    if dtype == "q8_0":
        return Type.Q8_0 if array.shape[-1] % 32 == 0 else Type.F16
    return Type.BF16 if dtype == "bf16" else Type.F16


def gguf_tensors(tensors: dict, config: dict, architecture: str, where: Path) -> dict[str, np.ndarray]:
    """float32 arrays under llama.cpp's names, in its row order; lm_head left out when tied."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in tensors
    result = {}
    for hf_name, tensor in tensors.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise UsageError(f"{where}: tensor {hf_name!r} has no place in a llama.cpp {architecture} model")
        array = tensor.as_float32()
        if architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
            array = permute_rotary(array, heads if ".attn_q." in name else kv_heads)
        result[name] = np.ascontiguousarray(array)
    return result


# ---- tokenizer ----------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer_json: dict, tokenizer_class: str, where: Path) -> str:
    """llama.cpp's name for the way the tokenizer splits text before BPE."""
    if tokenizer_class.removesuffix("Fast") == "Qwen2Tokenizer":
        return "qwen2"  # transformers builds Qwen2's split for this class, whatever tokenizer.json says
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_REGEX \
            and not steps[1].get("use_regex", True):
        return "qwen2"
    raise UsageError(f"{where}: its tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp "
                     "counterpart we know (supported: GPT-2, SmolLM and Qwen2 byte-level BPE)")


def merge_text(merge) -> str:
    """tokenizers writes merges as 'a b' (older) or ['a', 'b'] (newer); GGUF keeps 'a b'."""
    return merge if isinstance(merge, str) else " ".join(merge)


def token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def chat_template_of(folder: Path, tokenizer_config: dict) -> str:
    """The template the model was trained with: its own, else the one the pipeline gives base models."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return template or CHAT_TEMPLATE


def read_tokenizer(folder: Path, vocab_size: int) -> GgufTokenizer:
    """The byte-level BPE tokenizer of a Hugging Face folder, as GGUF lists it: one token per embedding row."""
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; the GGUF export needs the model's fast tokenizer")
    tokenizer_json = read_json(folder / "tokenizer.json")
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UsageError(f"{folder}: a {model.get('type')} tokenizer cannot be exported (byte-level BPE only)")
    ids = {token: int(i) for token, i in model["vocab"].items()}
    types = {int(i): NORMAL for i in ids.values()}
    for added in tokenizer_json.get("added_tokens", []):
        ids[added["content"]] = int(added["id"])
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    by_id = {i: token for token, i in ids.items()}
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, UNUSED) for i in range(size)]

    def token_id(key: str) -> int | None:
        return ids.get(token_content(tokenizer_config.get(key)))

    eos = token_id("eos_token")
    if eos is None:
        raise UserError(f"{folder}: tokenizer_config.json names no eos_token the vocabulary has")
    return GgufTokenizer(
        tokens=tokens, token_types=token_types, merges=[merge_text(m) for m in model.get("merges", [])],
        pre=pre_tokenizer_name(tokenizer_json, tokenizer_config.get("tokenizer_class", ""), folder),
        chat_template=chat_template_of(folder, tokenizer_config),
        eos_id=eos, end_of_turn_id=ids.get(END_OF_TURN, eos), bos_id=token_id("bos_token"),
        pad_id=token_id("pad_token"), add_bos=bool(tokenizer_config.get("add_bos_token", False)))


# ---- the file -----------------------------------------------------------------------------------

def add_hyperparameters(writer, config: dict, vocab_size: int, dtype: str, name: str) -> None:
    from gguf import LlamaFileType

    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = config.get("rope_parameters") or {}
    file_types = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                  "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def add_tokenizer(writer, tokenizer: GgufTokenizer) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.end_of_turn_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_chat_template(tokenizer.chat_template)


def write_gguf_file(path: Path, architecture: str, config: dict, arrays: dict[str, np.ndarray],
                    tokenizer: GgufTokenizer, dtype: str, name: str) -> None:
    from gguf import GGUFWriter
    from gguf.quants import quantize

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer announces the byte order at INFO
    writer = GGUFWriter(str(path), architecture)
    add_hyperparameters(writer, config, len(tokenizer.tokens), dtype, name)
    add_tokenizer(writer, tokenizer)
    # a bar on a terminal only: the export is seconds for the models here, log lines would be noise
    for tensor_name, array in tqdm(arrays.items(), desc="GGUF", unit="tensor", leave=False,
                                   disable=not sys.stderr.isatty()):
        kind = storage_type(array, dtype)
        writer.add_tensor(tensor_name, quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_gguf_output(output: Path) -> None:
    if output.suffix.lower() != ".gguf":
        raise UsageError(f"--output {output}: name the file with a .gguf suffix")
    if output.exists():
        raise UsageError(f"{output} already exists; choose a new --output file")
    check_can_write(output, "--output", folder=False)


def check_exportable(model_folder: Path) -> None:
    """Before a run that ends in a GGUF file: the gguf package is here, llama.cpp knows the model's architecture
    and can split text as its tokenizer does."""
    require_gguf()
    folders = source_folders(Path(model_folder), None)
    config = source_config(folders)
    gguf_architecture(config, Path(model_folder))
    source_tokenizer(folders, config)


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"writing a GGUF file needs the gguf package: {INSTALL_GGUF}") from None


def export_gguf(checkpoint: Path, output: Path, dtype: str = "f16", base: Path | None = None,
                replace: bool = False) -> GgufExport:
    """Write `checkpoint` (full folder or adapter, either backend) as the GGUF file `output`, and an Ollama
    Modelfile beside it. The file appears whole or not at all."""
    require_gguf()
    if dtype not in GGUF_DTYPES:
        raise UsageError(f"--dtype {dtype} cannot be written to GGUF (choose from {', '.join(GGUF_DTYPES)})")
    checkpoint, output = Path(checkpoint), Path(output)
    if not (replace and output.is_file()):
        check_gguf_output(output)
    folders = source_folders(checkpoint, base)
    config = source_config(folders)
    architecture = gguf_architecture(config, checkpoint)
    tokenizer = source_tokenizer(folders, config)
    modelfile = modelfile_text(output.name, tokenizer)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with full_model_folder(checkpoint, base) as folder:
            tensors, _ = read_model_weights(folder)
            arrays = gguf_tensors(tensors, config, architecture, checkpoint)
            write_gguf_file(staging, architecture, config, arrays, tokenizer, dtype, checkpoint.resolve().name)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    modelfile_path = output.with_name("Modelfile")
    write_atomically(modelfile_path, modelfile)
    return GgufExport(output, modelfile_path, architecture, dtype, len(arrays), output.stat().st_size)


# ---- Ollama -------------------------------------------------------------------------------------

def render_chat(chat_template: str, tokenizer: GgufTokenizer, messages: list[dict], generation: bool) -> str:
    """The chat template rendered as transformers renders it (a sandbox, blocks trimmed, loop controls)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    return environment.from_string(chat_template).render(
        messages=messages, add_generation_prompt=generation,
        bos_token=tokenizer.token(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
        eos_token=tokenizer.token(tokenizer.eos_id))


def ollama_template(tokenizer: GgufTokenizer) -> str | None:
    """The chat template as an Ollama (Go) template: the trained prompt around {{ .Prompt }}, the answer's turn
    closed after {{ .Response }} so earlier turns render too; None for a template that cannot be cut so."""
    from jinja2 import TemplateError

    prompt, response = "\x00prompt\x00", "\x00response\x00"
    user = {"role": "user", "content": prompt}
    try:
        opened = render_chat(tokenizer.chat_template, tokenizer, [user], generation=True)
        answered = render_chat(tokenizer.chat_template, tokenizer,
                               [user, {"role": "assistant", "content": response}], generation=False)
    except TemplateError:
        return None
    if opened.count(prompt) != 1 or not answered.startswith(opened + response) or "{{" in opened + answered:
        return None
    closing = answered[len(opened + response):]
    return opened.replace(prompt, "{{ .Prompt }}") + "{{ .Response }}" + closing


def modelfile_text(gguf_name: str, tokenizer: GgufTokenizer) -> str:
    """Ollama's Modelfile: the file, the trained prompt format, the stop tokens, greedy decoding."""
    template = ollama_template(tokenizer)
    stops = dict.fromkeys([tokenizer.token(tokenizer.end_of_turn_id), tokenizer.token(tokenizer.eos_id)])
    lines = ["# ollama create my-reasoner -f Modelfile && ollama run my-reasoner \"Calculate 23 + 15 + 8\"",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""' if template else
             "# no TEMPLATE: the chat template could not be cut around one message; Ollama reads the file's",
             *(f'PARAMETER stop "{stop}"' for stop in stops), "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
