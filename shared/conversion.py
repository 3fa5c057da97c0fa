"""Checkpoints converted between PyTorch (transformers / PEFT) and MLX (mlx-lm) layouts, exactly.

No framework is imported: tensors are renamed, transposed, dequantized or merged with numpy, so
the conversion runs on a machine that has only one of the two libraries.

LoRA is held in PEFT's orientation: A is (r, in) and B is (out, r), the update scale * B @ A.
mlx-lm keeps lora_a = A.T (in, r) and lora_b = B.T (r, out); its `scale` is PEFT's alpha / r.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np

from shared.checkpoints import (ADAPTER_CONFIG_FILE, MLX_ADAPTER_WEIGHTS_FILE, OPTIMIZER_FILE, adapter_base,
                                checkpoint_kind, rope_fields_for_older_readers)
from shared.errors import UserError
from shared.tensor_files import FLOAT_DTYPES, Tensor, from_float32, read_tensors, write_tensors

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
PEFT_PREFIX = "base_model.model."
BACKEND_OF_LAYOUT = {"peft": "torch", "mlx_lora": "mlx", "mlx_quantized": "mlx"}
NATIVE_LAYOUTS = {"torch": ("full", "peft"), "mlx": ("full", "mlx_lora", "mlx_quantized")}
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LIBRARIES = ("torch", "transformers", "peft", "mlx", "mlx-lm", "safetensors")
NOT_COPIED = {ADAPTER_CONFIG_FILE, MLX_ADAPTER_WEIGHTS_FILE, PEFT_WEIGHTS_FILE, OPTIMIZER_FILE, MANIFEST_FILE,
              "config.json", "README.md"}  # README.md: PEFT's model card, about the source layout
LAYER_PATH = re.compile(r"^(?P<stack>.*\.layers)\.(?P<index>\d+)\.(?P<inner>.+)$")


def detect_layout(folder: Path) -> str:
    """'peft', 'mlx_lora', 'mlx_quantized' or 'full' (checkpoint_kind, checked); a one-line error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint {str(folder)!r} does not exist")
    kind = checkpoint_kind(folder)
    if kind == "peft" and not (folder / PEFT_WEIGHTS_FILE).exists():
        raise UserError(f"{folder} has {ADAPTER_CONFIG_FILE} but no {PEFT_WEIGHTS_FILE} or "
                        f"{MLX_ADAPTER_WEIGHTS_FILE}: not an adapter layout this tool knows")
    if kind == "full":
        if not (folder / "config.json").exists() or not model_weight_files(folder):
            raise UserError(f"{folder} is not a checkpoint layout this tool knows (a Hugging Face model folder, "
                            "a PEFT adapter or an mlx-lm adapter)")
        if "quantization" in read_json(folder / "config.json"):
            return "mlx_quantized"
    return kind


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def model_weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("model*.safetensors"))


def read_model_weights(folder: Path) -> tuple[dict[str, Tensor], str | None]:
    """All tensors of a model folder (sharded or not) and the library that wrote them ('pt', 'mlx')."""
    tensors, writer = {}, None
    for file in model_weight_files(folder):
        part, file_metadata = read_tensors(file)
        tensors.update(part)
        writer = writer or file_metadata.get("format")
    return tensors, writer


# ---- hashes and the manifest -------------------------------------------------------------------

def weights_sha256(folder: Path) -> str:
    """sha256 of the tensors themselves (names, dtypes, shapes, bytes): the same for a model
    saved by either library, sharded or not. Cached while the files are unchanged, since converting
    then loading an adapter checks the same base several times."""
    files = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in model_weight_files(folder))
    return tensors_sha256(files)


@functools.lru_cache(maxsize=8)
def tensors_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    tensors = {}
    for path, _, _ in files:
        tensors.update(read_tensors(Path(path))[0])
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.array.shape)};".encode())
        digest.update(np.ascontiguousarray(tensor.array).tobytes())
    return digest.hexdigest()


def tokenizer_sha256(folder: Path) -> str | None:
    files = [Path(folder) / name for name in ("tokenizer.json", "vocab.json", "merges.txt")]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            pass
    return versions


def local_model_folder(name: str) -> Path | None:
    """A local folder, or a hub id already in the Hugging Face cache; None if neither."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, not a valid id, or no huggingface_hub: the caller decides
        return None


def write_manifest(folder: Path, backend: str, converted_from: dict | None = None) -> dict:
    """manifest.json: what wrote the checkpoint, the hashes of its base, the LoRA settings."""
    folder = Path(folder)
    layout = detect_layout(folder)
    manifest = {"layout": layout, "backend": backend, "libraries": library_versions()}
    if converted_from:
        manifest["converted_from"] = converted_from
    if layout in ("peft", "mlx_lora"):
        adapter = read_adapter(folder, layout)
        base_folder = local_model_folder(adapter.base)
        manifest["base"] = {"name": adapter.base,
                            "weights_sha256": weights_sha256(base_folder) if base_folder else None,
                            "tokenizer_sha256": tokenizer_sha256(base_folder) if base_folder else None}
        manifest["lora"] = {"rank": adapter.rank, "alpha": adapter.rank * adapter.scale, "scale": adapter.scale,
                            "dropout": adapter.dropout, "targets": adapter.module_names(),
                            "layers": adapter.layer_indices()}
    else:
        manifest["weights_sha256"] = weights_sha256(folder)
        manifest["tokenizer_sha256"] = tokenizer_sha256(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def check_adapter_base(adapter_folder: Path, base_folder: Path | None) -> None:
    """Refuse a base whose weights differ from the one the adapter's manifest records."""
    manifest_file = Path(adapter_folder) / MANIFEST_FILE
    if base_folder is None or not manifest_file.exists():
        return
    expected = (read_json(manifest_file).get("base") or {}).get("weights_sha256")
    if expected and weights_sha256(base_folder) != expected:
        raise UserError(f"{adapter_folder} was trained on a base with weights sha256 {expected[:12]}, but "
                        f"{base_folder} differs; pass the right base with --base")


def checked_adapter_base(adapter_folder: Path) -> str:
    """The base an adapter names, refused if its weights are not the ones the adapter was trained on."""
    base = adapter_base(adapter_folder)
    check_adapter_base(adapter_folder, local_model_folder(base))
    return base


# ---- LoRA adapters --------------------------------------------------------------------------------

@dataclass
class LoraAdapter:
    """A LoRA adapter independent of library: factors by module path, in PEFT's orientation."""
    base: str
    rank: int
    scale: float
    dropout: float
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # path -> (A (r,in), B (out,r))

    def module_names(self) -> list[str]:
        """The adapted modules inside a layer, e.g. 'self_attn.q_proj'."""
        return sorted({split_layer_path(path)[2] for path in self.factors})

    def layer_indices(self) -> list[int]:
        return sorted({split_layer_path(path)[1] for path in self.factors})

    def is_grid(self) -> bool:
        """Every adapted layer adapts the same modules (what layer selection + targets can express)."""
        return len(self.factors) == len(self.module_names()) * len(self.layer_indices())


def split_layer_path(path: str) -> tuple[str, int, str]:
    """'model.layers.3.self_attn.q_proj' -> ('model.layers', 3, 'self_attn.q_proj')."""
    match = LAYER_PATH.match(path)
    if not match:
        raise UserError(f"LoRA on {path!r} (outside the transformer layers) is not supported")
    return match["stack"], int(match["index"]), match["inner"]


def read_adapter(folder: Path, layout: str) -> LoraAdapter:
    return read_peft_adapter(folder) if layout == "peft" else read_mlx_adapter(folder)


def read_peft_adapter(folder: Path) -> LoraAdapter:
    config = read_json(Path(folder) / ADAPTER_CONFIG_FILE)
    unsupported = {"peft_type": config.get("peft_type", "LORA") != "LORA", "use_dora": config.get("use_dora"),
                   "bias": config.get("bias", "none") != "none", "modules_to_save": config.get("modules_to_save"),
                   "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")}
    if any(unsupported.values()):
        raise UserError(f"{folder}: PEFT adapters with {', '.join(k for k, v in unsupported.items() if v)} "
                        "cannot be converted (only plain LoRA)")
    rank = int(config["r"])
    scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    tensors, _ = read_tensors(Path(folder) / PEFT_WEIGHTS_FILE)
    factors: dict[str, list] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if not match:
            raise UserError(f"{folder}: unexpected tensor {name!r} in a PEFT LoRA adapter")
        factors.setdefault(match[1], [None, None])["AB".index(match[2])] = tensor
    return LoraAdapter(config.get("base_model_name_or_path") or "", rank, scale, float(config.get("lora_dropout", 0.0)),
                       complete_factors(factors, folder))


def read_mlx_adapter(folder: Path) -> LoraAdapter:
    config = read_json(Path(folder) / ADAPTER_CONFIG_FILE)
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{folder}: mlx-lm {config['fine_tune_type']} adapters cannot be converted (only LoRA)")
    lora = config["lora_parameters"]
    tensors, _ = read_tensors(Path(folder) / MLX_ADAPTER_WEIGHTS_FILE)
    factors: dict[str, list] = {}
    for name, tensor in tensors.items():
        path, leaf = name.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b"):
            raise UserError(f"{folder}: unexpected tensor {name!r} in an mlx-lm LoRA adapter")
        factors.setdefault(path, [None, None])[0 if leaf == "lora_a" else 1] = tensor.T
    return LoraAdapter(config.get("model") or "", int(lora["rank"]), float(lora["scale"]),
                       float(lora.get("dropout", 0.0)), complete_factors(factors, folder))


def complete_factors(factors: dict[str, list], folder: Path) -> dict[str, tuple[Tensor, Tensor]]:
    for path, pair in factors.items():
        if None in pair:
            raise UserError(f"{folder}: {path} has only one of its two LoRA factors")
    if not factors:
        raise UserError(f"{folder}: the adapter holds no LoRA weights")
    return {path: (a, b) for path, (a, b) in sorted(factors.items())}


def write_peft_adapter(adapter: LoraAdapter, folder: Path, num_layers: int) -> None:
    """adapter_model.safetensors + adapter_config.json, as `PeftModel.from_pretrained` reads them."""
    tensors = {}
    for path, (a, b) in adapter.factors.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    write_tensors(Path(folder) / PEFT_WEIGHTS_FILE, tensors, {"format": "pt"})
    layers = adapter.layer_indices()
    if adapter.is_grid():
        inner = adapter.module_names()
        leaves = [name.rsplit(".", 1)[-1] for name in inner]
        targets = sorted(leaves) if len(set(leaves)) == len(leaves) else inner
        selection = None if layers == list(range(num_layers)) else layers
    else:  # irregular: name every adapted module exactly
        targets, selection = sorted(adapter.factors), None
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapter.base,
              "r": adapter.rank, "lora_alpha": adapter.scale * adapter.rank, "lora_dropout": adapter.dropout,
              "target_modules": targets, "layers_to_transform": selection,
              "layers_pattern": "layers" if selection else None, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    (Path(folder) / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def write_mlx_adapter(adapter: LoraAdapter, folder: Path, num_layers: int) -> None:
    """adapters.safetensors + adapter_config.json, as `mlx_lm.load(base, adapter_path=...)` reads them."""
    tensors = {}
    for path, (a, b) in adapter.factors.items():
        tensors[f"{path}.lora_a"] = a.T
        tensors[f"{path}.lora_b"] = b.T
    write_tensors(Path(folder) / MLX_ADAPTER_WEIGHTS_FILE, tensors, {"format": "mlx"})
    layers = adapter.layer_indices()
    if adapter.is_grid() and layers == list(range(num_layers - len(layers), num_layers)):
        adapted, keys = len(layers), adapter.module_names()  # mlx-lm adapts the last `num_layers` layers
    else:  # keys that are full paths match outside the per-layer loop, so any selection loads exactly
        adapted, keys = 0, sorted(adapter.factors)
    config = {"fine_tune_type": "lora", "model": adapter.base, "num_layers": adapted,
              "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout,
                                  "keys": keys}}
    (Path(folder) / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


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
    if detect_layout(checkpoint) in NATIVE_LAYOUTS[backend]:
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
