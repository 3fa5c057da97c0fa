"""Atomic checkpoint folders: written beside the target, then renamed into place (the only writer of
whole folders), and the model cache they go to."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from shared.checkpoints.layouts import RUN_CONFIG_FILE
from shared.checkpoints.manifest import write_manifest
from shared.checkpoints.tensor_files import check_safetensors
from shared.runtime.distributed import launched_rank
from shared.runtime.errors import UsageError, UserError

logger = logging.getLogger("local_reasoning")


def cache_root() -> Path:
    """Where models built or imported on first use are kept: $LOCAL_REASONING_CACHE, else ~/.cache/local-reasoning."""
    root = os.environ.get("LOCAL_REASONING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "local-reasoning")
    return Path(root)


@contextmanager
def cache_lock(folder: Path):
    """Held while a cached model folder is checked and built: processes started together (torchrun ranks,
    parallel jobs) on a fresh cache build it once, one after the other, instead of racing the rename."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one process at a time is then the user's to arrange
        yield
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        yield


def write_atomically(path: Path, text: str) -> None:
    """A small file written beside its place and renamed into it: readers see the old text or the new."""
    staging = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


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


def resource_error(error: BaseException, data_parallel: bool) -> str | None:
    """The one line for a full disk, exhausted memory, or (in a data-parallel run) a collective that
    failed because another process died; None for any other error."""
    resumes = "(a train run continues from its last checkpoint)"
    if is_out_of_space(error):
        filename, reason = getattr(error, "filename", None), getattr(error, "strerror", None) or str(error)
        return (f"no space left {f'to write {filename}' if filename else 'on the disk'} ({reason}); free some and "
                f"run the command again {resumes}")
    if is_out_of_memory(error):
        return (f"out of memory ({str(error).splitlines()[0][:120] if str(error) else 'MemoryError'}); lower "
                f"--group-size, --prompts-per-step, --sft-batch-size or --micro-batch-size {resumes}")
    if data_parallel and isinstance(error, RuntimeError):
        return f"lost the other processes ({str(error).splitlines()[0][:160]})"
    return None


def check_can_write(path: Path, flag: str, folder: bool) -> None:
    """Before any work: `path` can be written, as a folder or a file (or created, under its nearest
    existing parent)."""
    path = Path(path)
    wanted = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{flag} {path} is {'a file' if folder else 'a folder'}; give {wanted}")
    nearest = path if path.exists() else next(parent for parent in path.absolute().parents if parent.exists())
    if not nearest.is_dir():
        raise UsageError(f"{flag} {path} cannot be {wanted}: {nearest} is a file")
    # tried, not guessed from permissions: root passes any access check, yet cannot write under /proc
    where = path if folder and path.is_dir() else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=where))
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written ({error.strerror or error})") from None


@contextmanager
def hold_output(folder: Path):
    """Held while a run writes `folder`: a second run there is a one-line error, not two runs
    overwriting each other. The operating system releases the lock when the process ends, however."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then the user's to arrange
        fcntl = None
    if fcntl is None or launched_rank() != 0:  # in a data-parallel run the first process holds it
        yield
        return
    folder, lock_file = Path(folder), Path(folder) / ".run.lock"
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(lock_file, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise UsageError(f"{folder} is in use by another run ({holder}); wait for it to finish, "
                                 "or choose another --output-dir") from None
            lock.seek(0)
            lock.truncate()
            lock.write(f"process {os.getpid()}")
            lock.flush()
            yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [lock_file.name]:  # refused before any work
            lock_file.unlink()
            folder.rmdir()


def is_out_of_memory(error: BaseException) -> bool:
    """Memory exhausted, as Python, PyTorch (CPU or CUDA) and MLX report it."""
    return isinstance(error, MemoryError) or any(
        text in str(error) for text in ("out of memory", "can't allocate memory", "bad_alloc", "Unable to allocate"))


def save_checkpoint(backend, target: Path, run_config_json: str, extra_files: dict[str, str] | None = None) -> Path:
    """The backend's files plus run_config.json, manifest.json and `extra_files`, all or nothing.

    Every safetensors file is read back before the rename: some writers drop data on a full disk
    without raising.
    """
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
