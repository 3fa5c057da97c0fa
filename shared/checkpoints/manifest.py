"""manifest.json: what wrote a checkpoint, the hashes of its weights or its adapter's base, the LoRA
settings; and the check that an adapter meets the base it was trained on."""
from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np

from shared.checkpoints.layouts import MANIFEST_FILE, adapter_base, detect_layout, model_weight_files, read_json
from shared.checkpoints.lora_files import read_adapter
from shared.checkpoints.tensor_files import read_tensors
from shared.runtime.errors import UserError

LIBRARIES = ("torch", "transformers", "peft", "mlx", "mlx-lm", "safetensors")


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
