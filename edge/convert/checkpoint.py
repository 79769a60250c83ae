"""Lazy access to the tensors of a safetensors checkpoint (single file or sharded).

Only the headers are read up front; each tensor is memory-mapped when it is loaded and
unmapped right after, so converting never holds more than one tensor in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.utility import LocalTensor, SafetensorsLocal

from edge.errors import ConversionError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass
class Checkpoint:
    hf_dir: Path
    tensors: dict[str, LocalTensor]
    files: list[Path]

    @classmethod
    def open(cls, hf_dir: Path) -> Checkpoint:
        files = _safetensors_files(hf_dir)
        tensors: dict[str, LocalTensor] = {}
        for f in files:
            try:
                part = SafetensorsLocal(f).tensors
            except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
                raise ConversionError(f"{f} is not a readable safetensors file ({e}); re-download it") from None
            size = f.stat().st_size
            for name, t in part.items():
                if t.dtype not in _DTYPES:
                    raise ConversionError(
                        f"tensor {name} in {f.name} has dtype {t.dtype}; edge convert reads F32, F16, BF16"
                    )
                r = t.data_range
                if r.offset + r.size > size or r.size != int(np.prod(t.shape, dtype=np.int64)) * np.dtype(_DTYPES[t.dtype]).itemsize:
                    raise ConversionError(f"{f.name} is truncated or corrupt (tensor {name}); re-download it")
                tensors[name] = t
        return cls(hf_dir, tensors, files)

    def load(self, name: str, dtype: type[np.generic] = np.float32) -> np.ndarray:
        """The tensor as `dtype` (float32, or float16 straight from an f16 file, no widening)."""
        t = self.tensors[name]
        raw = t.mmap_bytes()
        try:
            a = raw.view(_DTYPES[t.dtype]).reshape(t.shape)
            if t.dtype == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)  # exact widening
            return a.astype(dtype)  # a copy: the mapping can go
        finally:
            del raw  # unmap: pages of tensors already written must not count against us

    def dtype_of(self, name: str) -> str:
        return self.tensors[name].dtype


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ConversionError(f"{index} is malformed ({e}); re-download it") from None
        files = [hf_dir / n for n in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(
                f"shard(s) {', '.join(missing)} listed in {index.name} are missing; download them"
            )
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    if list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pt")) or list(hf_dir.glob("*.pth")):
        raise ConversionError(
            f"{hf_dir} holds PyTorch pickle weights (.bin/.pt), which can run code when loaded, so "
            "edge does not read them; convert them to safetensors first, e.g. in Python: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    raise ConversionError(f"{hf_dir} has no *.safetensors weights; download the model's safetensors files")
