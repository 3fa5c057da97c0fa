"""Checkpoints converted between PyTorch (transformers / PEFT) and MLX (mlx-lm) layouts, exactly.

No framework is imported: tensors are renamed, transposed, dequantized or merged with numpy, so
the conversion runs on a machine that has only one of the two libraries.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.checkpoints.layouts import (ADAPTER_CONFIG_FILE, BACKEND_OF_LAYOUT, MANIFEST_FILE, MLX_ADAPTER_WEIGHTS_FILE,
                                        MODEL_WEIGHTS_FILE, OPTIMIZER_FILE, PEFT_WEIGHTS_FILE, detect_layout,
                                        model_weight_files, native_layouts, read_json, rope_fields_for_older_readers)
from shared.checkpoints.lora_files import LoraAdapter, read_adapter, write_mlx_adapter, write_peft_adapter
from shared.checkpoints.manifest import check_adapter_base, local_model_folder, write_manifest
from shared.checkpoints.tensor_files import FLOAT_DTYPES, Tensor, from_float32, read_tensors, write_tensors
from shared.runtime.errors import UsageError, UserError

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHORT_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # llama.cpp's names
NOT_COPIED = {ADAPTER_CONFIG_FILE, MLX_ADAPTER_WEIGHTS_FILE, PEFT_WEIGHTS_FILE, OPTIMIZER_FILE, MANIFEST_FILE,
              "config.json", "README.md"}  # README.md: PEFT's model card, about the source layout


def framework_dtype(name: str | None) -> str | None:
    """--dtype in the frameworks' names: f16 is float16; q8_0 exists only in GGUF files."""
    long_names = {short: long for long, short in SHORT_DTYPE_NAMES.items()}
    if name is not None and name not in DTYPES and name not in long_names:
        raise UsageError(f"--dtype {name} is a GGUF type: use it with --to gguf")
    return long_names.get(name, name)


def read_model_weights(folder: Path) -> tuple[dict[str, Tensor], str | None]:
    """All tensors of a model folder (sharded or not) and the library that wrote them ('pt', 'mlx')."""
    tensors, writer = {}, None
    for file in model_weight_files(folder):
        part, file_metadata = read_tensors(file)
        tensors.update(part)
        writer = writer or file_metadata.get("format")
    return tensors, writer


# ---- full weights -------------------------------------------------------------------------------

def unpack_quantized(packed: np.ndarray, bits: int) -> np.ndarray:
    """mlx's packing: values of `bits` bits, least significant first, along each row's uint32 words."""
    rows = packed.reshape(packed.shape[0], -1)
    if 32 % bits == 0:
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        values = (rows[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
        return values.reshape(rows.shape[0], -1)
    stream = np.unpackbits(rows.view(np.uint8), axis=1, bitorder="little")
    groups = stream.reshape(rows.shape[0], -1, bits).astype(np.uint32)
    return (groups << np.arange(bits, dtype=np.uint32)).sum(axis=2)


def dequantize_weights(tensors: dict[str, Tensor], quantization: dict) -> dict[str, Tensor]:
    """mlx-lm affine quantization undone: w = scale * q + bias per group, in the scales' dtype."""
    result = dict(tensors)
    for name in [n for n in tensors if n.endswith(".scales")]:
        path = name[:-len(".scales")]
        settings = {**quantization, **(quantization.get(path) if isinstance(quantization.get(path), dict) else {})}
        if settings.get("mode", "affine") != "affine":
            raise UserError(f"{path}: mlx {settings['mode']} quantization cannot be converted (affine only)")
        bits, group_size = int(settings["bits"]), int(settings["group_size"])
        scales, biases = tensors[name], tensors[f"{path}.biases"]
        values = unpack_quantized(tensors[f"{path}.weight"].array, bits).astype(np.float32)
        out = values.shape[0]
        grouped = values.reshape(out, -1, group_size)
        weight = grouped * scales.as_float32()[..., None] + biases.as_float32()[..., None]
        result[f"{path}.weight"] = from_float32(weight.reshape(out, -1), scales.dtype)
        del result[name], result[f"{path}.biases"]
    return result


def cast_tensor(tensor: Tensor, dtype: str | None) -> Tensor:
    """Floating-point tensors to `dtype` (None: unchanged); integer tensors (packed weights) untouched."""
    if dtype is None or tensor.dtype == dtype or tensor.dtype not in FLOAT_DTYPES:
        return tensor
    return from_float32(tensor.as_float32(), dtype)


def cast(tensors: dict[str, Tensor], dtype: str | None) -> dict[str, Tensor]:
    return {name: cast_tensor(tensor, dtype) for name, tensor in tensors.items()}


def merge_adapter(tensors: dict[str, Tensor], adapter: LoraAdapter) -> dict[str, Tensor]:
    """W + scale * B @ A for each adapted module, in fp32, stored back in W's dtype."""
    merged = dict(tensors)
    for path, (a, b) in adapter.factors.items():
        weight = tensors.get(f"{path}.weight")
        if weight is None:
            raise UserError(f"the base has no {path}.weight for the adapter's factors")
        update = adapter.scale * (b.as_float32() @ a.as_float32())
        merged[f"{path}.weight"] = from_float32(weight.as_float32() + update, weight.dtype)
    return merged


def target_config(config: dict, tensors: dict[str, Tensor], target: str) -> dict:
    """config.json for the target: no quantization once dequantized, its dtype, rope fields mlx-lm reads."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    float_dtypes = {t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES}
    if len(float_dtypes) == 1:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = TORCH_DTYPE_NAMES.get(float_dtypes.pop())
    if target == "mlx":
        config.update(rope_fields_for_older_readers(config))
    return config


def write_full_model(folder: Path, tensors: dict[str, Tensor], config: dict, target: str) -> None:
    write_tensors(Path(folder) / MODEL_WEIGHTS_FILE, tensors, {"format": "pt" if target == "torch" else "mlx"})
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))


def copy_side_files(source: Path, folder: Path) -> None:
    """Tokenizer, chat template, generation config and the like: everything but weights and configs
    of another layout."""
    for file in Path(source).iterdir():
        if file.is_file() and file.name not in NOT_COPIED and not file.name.endswith(".safetensors") \
                and not file.name.endswith(".safetensors.index.json"):
            shutil.copy2(file, Path(folder) / file.name)


# ---- the conversion ------------------------------------------------------------------------------

@dataclass
class ConversionRequest:
    source: Path
    target: str                        # 'torch' or 'mlx'
    merge: bool = False
    dtype: str | None = None           # 'float32', 'float16', 'bfloat16'
    base: Path | None = None           # overrides the base an adapter names
    source_backend: str | None = None  # 'torch' or 'mlx' where the layout does not tell


def resolve_base(adapter: LoraAdapter, source: Path, override: Path | None) -> Path:
    folder = Path(override) if override else local_model_folder(adapter.base)
    if folder is None or not folder.is_dir():
        raise UserError(f"the adapter's base {adapter.base!r} is not on this machine; pass it with --base PATH")
    check_adapter_base(source, folder)
    return folder


def convert_checkpoint(request: ConversionRequest, output: Path) -> dict:
    """Write `request.source` into `output` (a new folder) in the target's native layout; returns the manifest."""
    source, output = Path(request.source), Path(output)
    layout = detect_layout(source)
    converted_from = {"path": str(source), "layout": layout,
                      "backend": source_backend(source, layout, request.source_backend)}
    output.mkdir(parents=True, exist_ok=True)
    if layout in ("peft", "mlx_lora"):
        convert_adapter(request, layout, output)
    else:
        convert_full_model(request, layout, output)
    return write_manifest(output, request.target, converted_from)


def convert_adapter(request: ConversionRequest, layout: str, output: Path) -> None:
    """The other library's adapter layout, or with --merge a full model folder."""
    source, target, dtype = Path(request.source), request.target, DTYPES.get(request.dtype)
    adapter = read_adapter(source, layout)
    base_folder = resolve_base(adapter, source, request.base)
    base_config = read_json(base_folder / "config.json")
    if request.base:
        adapter.base = str(Path(request.base).resolve())
    quantized_base = "quantization" in base_config
    if target == "torch" and quantized_base and not request.merge:
        raise UserError(f"the base {adapter.base!r} is an mlx-quantized model, which PyTorch cannot load: "
                        "add --merge to fuse the adapter into dequantized weights")
    if request.merge:
        tensors, _ = read_model_weights(base_folder)
        if quantized_base:
            tensors = dequantize_weights(tensors, base_config["quantization"])
        tensors = cast(merge_adapter(tensors, adapter), dtype)
        write_full_model(output, tensors, target_config(base_config, tensors, target), target)
        copy_side_files(base_folder, output)
    else:
        adapter.factors = {path: (cast_tensor(a, dtype), cast_tensor(b, dtype))
                           for path, (a, b) in adapter.factors.items()}
        num_layers = int(base_config["num_hidden_layers"])
        (write_peft_adapter if target == "torch" else write_mlx_adapter)(adapter, output, num_layers)
    copy_side_files(source, output)


def convert_full_model(request: ConversionRequest, layout: str, output: Path) -> None:
    """A full folder for the target: dequantized for PyTorch, cast with --dtype, tensors otherwise as they are."""
    source, target, dtype = Path(request.source), request.target, DTYPES.get(request.dtype)
    if request.merge or request.base:
        raise UserError(f"{source} is a full model: --merge and --base apply to LoRA adapters")
    config = read_json(source / "config.json")
    tensors, _ = read_model_weights(source)
    if layout == "mlx_quantized":
        if target == "mlx" and dtype:
            raise UserError("--dtype on a quantized mlx model: it stays quantized for mlx; convert --to torch "
                            "to dequantize")
        if target == "torch":
            tensors = dequantize_weights(tensors, config["quantization"])
    tensors = cast(tensors, dtype)
    if layout == "full" or target == "torch":
        config = target_config(config, tensors, target)
    write_full_model(output, tensors, config, target)
    copy_side_files(source, output)


@contextmanager
def native_layout(checkpoint: Path, backend: str):
    """The checkpoint itself if `backend` reads its layout, else a converted copy that lives for the block."""
    if detect_layout(checkpoint) in native_layouts(backend):
        yield Path(checkpoint)
        return
    with tempfile.TemporaryDirectory(prefix="local-reasoning-converted-") as folder:
        convert_checkpoint(ConversionRequest(Path(checkpoint), backend), Path(folder))
        yield Path(folder)


def source_backend(folder: Path, layout: str, stated: str | None = None) -> str:
    """The library that wrote a checkpoint: its layout, else --from, else its manifest or file metadata."""
    if layout in BACKEND_OF_LAYOUT:
        if stated and stated != BACKEND_OF_LAYOUT[layout]:
            raise UserError(f"{folder} holds a {layout} checkpoint, which {BACKEND_OF_LAYOUT[layout]} writes, "
                            f"not {stated}; leave out --from")
        return BACKEND_OF_LAYOUT[layout]
    if stated:
        return stated
    manifest = Path(folder) / MANIFEST_FILE
    if manifest.exists():
        return read_json(manifest).get("backend", "unknown")
    _, writer = read_model_weights(folder)
    return {"pt": "torch", "mlx": "mlx"}.get(writer or "", "unknown")
