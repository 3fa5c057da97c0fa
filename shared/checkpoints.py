"""Atomic checkpoint folders: written beside the target, then renamed into place."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from shared.errors import UserError

logger = logging.getLogger("local_reasoning")

RUN_CONFIG_FILE = "run_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MLX_ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW moments, `{parameter}.exp_avg[_sq]` and `step`


def cache_root() -> Path:
    """Where models built or imported on first use are kept: $LOCAL_REASONING_CACHE, else ~/.cache/local-reasoning."""
    root = os.environ.get("LOCAL_REASONING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "local-reasoning")
    return Path(root)


@contextmanager
def atomic_folder(target: Path):
    """Yield a staging folder; on success it replaces `target` in one rename, on failure it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        make_readable(staging)
        make_durable(staging)
        previous = None
        if target.exists():
            previous = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, previous)
        os.replace(staging, target)
        if previous:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_readable(folder: Path) -> None:
    """mkdtemp makes private folders; a checkpoint gets the usual permissions (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def make_durable(folder: Path) -> None:
    """On disk before the rename, so a power cut cannot leave a renamed folder of empty files."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_out_of_space(error: BaseException) -> bool:
    """A full disk (or quota, or file-size limit), also as the libraries' writers report it."""
    if isinstance(error, OSError) and error.errno in NO_ROOM:
        return True
    return any(text in str(error) for text in ("No space left", "os error 28", "File too large", "os error 27"))


def save_checkpoint(backend, target: Path, run_config_json: str, extra_files: dict[str, str] | None = None) -> Path:
    """The backend's files plus run_config.json, manifest.json and `extra_files`, all or nothing.

    Every safetensors file is read back before the rename: some writers drop data on a full disk
    without raising.
    """
    from shared.conversion import write_manifest  # it reads checkpoints with this module's helpers

    try:
        with atomic_folder(target) as staging:
            backend.save(staging)
            (staging / RUN_CONFIG_FILE).write_text(run_config_json)
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)
            write_manifest(staging, backend.name)
            for file in staging.glob("*.safetensors"):
                check_safetensors(file)
    except (OSError, RuntimeError, UserError) as error:
        raise checkpoint_write_error(target, error) from None
    except Exception as error:  # safetensors' own SafetensorError, for one
        if not is_out_of_space(error):
            raise
        raise checkpoint_write_error(target, error) from None
    return Path(target)


def checkpoint_write_error(target: Path, error: BaseException) -> UserError:
    logger.debug("writing %s failed", target, exc_info=error)
    reason = "no space left to write it" if is_out_of_space(error) else str(error).splitlines()[0][:200]
    return UserError(f"could not write checkpoint {target} ({reason}); nothing half-written was left "
                     "and earlier checkpoints are intact")


def check_checkpoint(path: Path) -> Path:
    """A readable model folder, or a one-line error saying what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist (train one with: python cli.py train)")
    weights = list(path.glob("*.safetensors"))
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG_FILE).exists():
        raise UserError(f"{path} is not a model folder: no config.json or {ADAPTER_CONFIG_FILE}")
    if not weights:
        raise UserError(f"{path} holds no .safetensors weights")
    for file in weights:
        check_safetensors(file)
    return path


def rope_fields_for_older_readers(config: dict) -> dict:
    """transformers 5 writes rope_theta only inside rope_parameters; mlx-lm reads the top-level field
    and silently falls back to its own default (1e6) without it."""
    rope = config.get("rope_parameters")
    if "rope_theta" in config or not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    fields = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    return fields


def checkpoint_kind(path: Path) -> str:
    """'full' (a Hugging Face model folder), 'peft' (a PEFT LoRA adapter) or 'mlx_lora' (mlx-lm's)."""
    path = Path(path)
    if (path / MLX_ADAPTER_WEIGHTS_FILE).exists():
        return "mlx_lora"
    if (path / ADAPTER_CONFIG_FILE).exists():
        return "peft"
    return "full"


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on, as its own library records it."""
    config = json.loads((Path(path) / ADAPTER_CONFIG_FILE).read_text())
    key = "model" if checkpoint_kind(path) == "mlx_lora" else "base_model_name_or_path"
    if not config.get(key):
        raise UserError(f"{path}/{ADAPTER_CONFIG_FILE} does not name its base model ({key!r})")
    return config[key]


def check_safetensors(file: Path) -> None:
    """Catch a truncated or corrupted file before a library fails on it with a traceback."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        header = handle.read(8)
        if len(header) < 8:
            raise UserError(f"{file} is truncated (only {size} bytes)")
        header_length = int.from_bytes(header, "little")
        if header_length > size - 8:
            raise UserError(f"{file} is corrupted or truncated (header says {header_length} bytes, file has {size})")
        try:
            metadata = json.loads(handle.read(header_length))
        except ValueError:
            raise UserError(f"{file} is corrupted: its header is not valid JSON") from None
    data_end = max((entry["data_offsets"][1] for name, entry in metadata.items() if name != "__metadata__"),
                   default=0)
    if 8 + header_length + data_end > size:
        raise UserError(f"{file} is truncated: {size} bytes, needs {8 + header_length + data_end}")
