"""safetensors files read and written with numpy alone, bfloat16 included.

numpy has no bfloat16, so a BF16 tensor travels as its raw uint16 bits: copying, transposing and
renaming it is then bit-exact, and `as_float32` widens it (exactly) when arithmetic is needed.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.runtime.errors import UserError

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class Tensor:
    """A tensor as stored: its safetensors dtype name and the array (raw uint16 bits for BF16)."""
    dtype: str
    array: np.ndarray

    @property
    def T(self) -> "Tensor":
        return Tensor(self.dtype, np.ascontiguousarray(self.array.T))

    def as_float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array.astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> Tensor:
    """fp32 values stored as `dtype`; BF16 rounds to nearest even, as torch and mlx do."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "BF16":
        bits = values.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = np.where(np.isnan(values), 0x7FC0, rounded)
        return Tensor("BF16", rounded.astype(np.uint16))
    return Tensor(dtype, values.astype(NUMPY_DTYPES[dtype]))


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors by name, the file's metadata)."""
    check_safetensors(Path(path))
    data = Path(path).read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_length])
    metadata = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + header_length:]
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        tensors[name] = Tensor(entry["dtype"], array)
    return tensors, metadata


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        size = tensor.array.nbytes
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in sorted(tensors):
            handle.write(np.ascontiguousarray(tensors[name].array).tobytes())


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
