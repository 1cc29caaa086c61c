"""Reading and writing safetensors files, one file or many with an index, without torch and without copies.

The format (huggingface/safetensors): an 8-byte little-endian header length, a JSON header mapping each tensor
name to {dtype, shape, data_offsets} (offsets into the byte buffer that follows) plus an optional
`__metadata__`, then the raw little-endian bytes. A model saved in several files has a
`model.safetensors.index.json` whose `weight_map` names the file of every tensor (transformers'
`save_pretrained(max_shard_size=…)`).

Reading memory-maps each file and returns numpy views, so a loader touches only the tensors (and, through
`jax.make_array_from_callback`, only the slices) it needs. bfloat16 and float8 come from ml_dtypes (through
jax's numpy dtypes); the `safetensors` package's numpy backend has no bfloat16, which is why this module
exists. Writing streams one tensor at a time from a producer, so an export never holds the whole model on the
host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from mamba_jax.interop.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """(header, offset of the byte buffer) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path} is not a safetensors file (it is {len(raw)} bytes long); re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or n > os.path.getsize(path) - 8:
            raise ConversionError(f"{path} is not a safetensors file (bad header length {n}); re-download it.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConversionError(f"{path} has a corrupt safetensors header ({e}); re-download it.") from e
    return header, 8 + n


class SafetensorsDir:
    """Every tensor of a Hugging Face model directory, read lazily: `names`, `shape(n)`, `get(n)`."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
            if missing:
                raise ConversionError(
                    f"{directory}: {INDEX_NAME} names {len(files)} weight files but {', '.join(missing[:3])}"
                    f"{' …' if len(missing) > 3 else ''} {'is' if len(missing) == 1 else 'are'} missing; "
                    f"download the missing file(s) into the directory."
                )
        elif os.path.isfile(os.path.join(directory, SINGLE_NAME)):
            files = [SINGLE_NAME]  # not other .safetensors beside it (e.g. Mistral's consolidated.safetensors)
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(
                f"{directory} holds no .safetensors weights (only safetensors are read; a PyTorch .bin checkpoint "
                f"can be re-saved with transformers' `model.save_pretrained(dir, safe_serialization=True)`)."
            )
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, start = read_header(path)
            for key, entry in header.items():
                if key != "__metadata__":
                    self._entries[key] = (path, entry, start)
        self._maps: dict[str, np.memmap] = {}

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` (memory-mapped: nothing is read until it is used)."""
        path, entry, start = self._entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name} has dtype {entry['dtype']}, which mamba_jax cannot read.")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        return self._maps[path][start + begin : start + end].view(dtype).reshape(entry["shape"])


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype up front (for the header), its bytes when written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_file(path: str, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the buffer to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if value.shape != t.shape:
                raise AssertionError(f"{t.name}: produced {value.shape}, planned {t.shape}")
            f.write(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def write_sharded(directory: str, tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[str]:
    """Write `tensors` as model.safetensors, or as numbered files plus an index when they exceed one shard."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_file(os.path.join(directory, SINGLE_NAME), shards[0])
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(os.path.join(directory, name), shard)
        weight_map.update({t.name: name for t in shard})
    total = sum(t.nbytes for shard in shards for t in shard)
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return [*names, INDEX_NAME]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ bytes, '64KiB' → 65536 (transformers' `max_shard_size` spelling)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConversionError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 64KiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
