"""`convert`'s work: a checkpoint to the other backend's layout, to a GGUF file, or a GGUF file to a folder."""
from __future__ import annotations

from pathlib import Path

from shared.checkpoints.conversion import ConversionRequest, convert_checkpoint, framework_dtype
from shared.checkpoints.folders import atomic_folder, check_can_write
from shared.checkpoints.layouts import check_checkpoint
from shared.runtime.errors import UserError


def convert(checkpoint: Path, target: str, output: Path, source: str | None = None, merge: bool = False,
            dtype: str | None = None, base: Path | None = None) -> str:
    """Writes `output` and says what it holds, in one line."""
    if target == "gguf":
        from shared.models.gguf_export import export_gguf, gguf_dtype

        return export_gguf(check_checkpoint(checkpoint), output, gguf_dtype(dtype), base).summary()
    if output.exists():
        raise UserError(f"{output} already exists; choose a new --output folder")
    check_can_write(output, "--output", folder=True)
    if checkpoint.suffix.lower() == ".gguf":
        from shared.models.pretrained import import_gguf_file

        import_gguf_file(checkpoint, output, target)
        return f"{checkpoint} (GGUF) -> {output} (full, {target}, float32); manifest.json records hashes and versions"
    request = ConversionRequest(check_checkpoint(checkpoint), target, merge, framework_dtype(dtype), base, source)
    with atomic_folder(output) as staging:
        manifest = convert_checkpoint(request, staging)
    origin = manifest["converted_from"]
    return (f"{checkpoint} ({origin['layout']}, {origin['backend']}) -> {output} "
            f"({manifest['layout']}, {target}); manifest.json records hashes and versions")
