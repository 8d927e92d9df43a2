"""A fast GGUF reader for tests: metadata as Python values, tensors as raw blocks.

gguf.GGUFReader builds a numpy view per array element, which takes ~10 s per file for a 128k
vocabulary with 280k merges; comparing two such files for each of three BPE families would be most
of the family test's time. This reads the same format (GGUF v3: header, key/values, tensor infos,
aligned data; gguf-py/gguf/gguf_reader.py) in one pass, and is checked against GGUFReader on a
small file in test_family_gguf.py."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class Tensor:
    name: str
    shape: list[int]   # GGUF order: the row length first
    qtype: int         # gguf.GGMLQuantizationType value
    raw: np.ndarray    # uint8 blocks, one row of the tensor per line

    def values(self) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.raw, GGMLQuantizationType(self.qtype)).reshape(-1)


class Reader:
    def __init__(self, path: str | Path):
        self.buf = memoryview(Path(path).read_bytes())
        self.pos = 0
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", self.buf, 0)
        assert magic == b"GGUF" and version == 3, (magic, version)
        self.pos = 24
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._u("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            shape = [self._u("<Q") for _ in range(self._u("<I"))]
            infos.append((name, shape, self._u("<I"), self._u("<Q")))
        align = self.fields.get("general.alignment", 32)
        start = -(-self.pos // align) * align
        self.tensors = {name: self._tensor(name, shape, qtype, start + offset) for name, shape, qtype, offset in infos}

    def _u(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._u("<Q")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, n = self._u("<I"), self._u("<Q")
            if item == _STRING:
                return [self._string() for _ in range(n)]
            dtype = np.dtype(_NUMPY[item])
            out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            return out.tolist()
        value = self._u(_SCALARS[kind])
        return value

    def _tensor(self, name: str, shape: list[int], qtype: int, offset: int) -> Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        row = shape[0] // block * size
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        raw = np.frombuffer(self.buf, dtype=np.uint8, count=row * rows, offset=offset).reshape(rows, row)
        return Tensor(name, shape, qtype, raw)
