"""Mixed files: a fast quant type for most tensors, a safer one for the few that cost most KL.

On a CPU where llama.cpp repacks a type (Q4_0 and IQ4_NL into interleaved rows on x86
AVX2/AVX-512 and ARM with dotprod), that type decodes much faster than its neighbours, but
its KL may be over the budget. The KL usually comes from a few tensor classes (attn_v and
ffn_down on SmolLM2-135M): keeping those in a type within the budget buys most of the
quality back at a fraction of the speed. llama-quantize does this by hand (`--tensor-type`);
here the classes are chosen by measurement:

1. KL of the fast file with one class at a time taken from the safe file;
2. classes ordered by KL saved per weight moved (what stays on the fast path is speed);
3. taken in that order, the mix measured after each, until its KL is ≤ the target.

A mix is written by copying each tensor's bytes from one of the two files (both are
llama.cpp's own output for the same source), so nothing is quantized twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BadOptionError
from edge.paths import atomic_path

MIX_RE = re.compile(r"^(?P<fast>[^~\[\]]+)~(?P<safe>[^~\[\]]+)\[(?P<take>[a-z0-9_,.]*)\]$")
_BLK = re.compile(r"^blk\.\d+\.(?P<cls>.+)\.weight$")


def tensor_class(name: str) -> str:
    """'blk.7.attn_v.weight' → 'attn_v'; 'token_embd.weight' → 'token_embd'."""
    m = _BLK.match(name)
    return m["cls"] if m else name.removesuffix(".weight")


@dataclass(frozen=True)
class Mix:
    fast: str  # quant name (as tune names files: 'IQ4_NL+imatrix') of most tensors
    safe: str  # quant name of the tensors in `take`
    take: tuple[str, ...]  # tensor classes from the safe file, sorted

    @property
    def name(self) -> str:
        """Its quant name in tune's candidates and journal ('IQ4_NL+imatrix~Q4_1[attn_v]')."""
        return f"{self.fast}~{self.safe}[{','.join(self.take)}]"

    @classmethod
    def parse(cls, name: str) -> Mix | None:
        m = MIX_RE.match(name)
        if m is None:
            return None
        return cls(m["fast"], m["safe"], tuple(t for t in m["take"].split(",") if t))

    def describe(self) -> str:
        return f"{self.fast} with {', '.join(self.take)} in {self.safe}" if self.take else self.fast

    def file_name(self) -> str:
        return f"mix.{hashlib.sha256(self.name.encode()).hexdigest()[:12]}.gguf"


def class_sizes(fast: Path, safe: Path) -> dict[str, int]:
    """Weights per tensor class, for the classes whose tensor types differ between the files
    (the rest would be the same bytes either way)."""
    from edge.gguf_file import inspect

    a, b = inspect(fast), inspect(safe)
    types_b = {t.name: t.type for t in b.tensors}
    if {t.name for t in a.tensors} != set(types_b):
        raise BadOptionError(f"{fast.name} and {safe.name} do not hold the same tensors")
    sizes: dict[str, int] = {}
    for t in a.tensors:
        if len(t.shape) >= 2 and t.type != types_b[t.name]:
            sizes[tensor_class(t.name)] = sizes.get(tensor_class(t.name), 0) + t.n_elements
    return sizes


def write_mix(fast: Path, safe: Path, out: Path, take: Iterable[str], *, note: str = "") -> Path:
    """`fast` with the tensors of the classes in `take` copied from `safe` (atomically)."""
    import gguf

    take = set(take)
    ra, rb = gguf.GGUFReader(str(fast)), gguf.GGUFReader(str(safe))
    by_name = {t.name: t for t in rb.tensors}
    chosen = [by_name[t.name] if tensor_class(t.name) in take else t for t in ra.tensors]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), str(ra.fields[gguf.Keys.General.ARCHITECTURE].contents()))
        for f in ra.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            w.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
        if note:
            w.add_string("edge.tune.mix", note)
        for t in chosen:
            w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in chosen:
            w.write_tensor_data(t.data, tensor_endianess=ra.endianess)
        w.close()
    return out


@dataclass
class MixSearch:
    """What the greedy search measured: KL per mix name, and the mix it chose (None: none
    within the target)."""

    fast: str
    safe: str
    target: float
    kl: dict[str, float] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # classes by KL saved per weight
    chosen: Mix | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"fast": self.fast, "safe": self.safe, "target": self.target, "kl": self.kl,
                "order": self.order, "chosen": self.chosen.name if self.chosen else None}


def search_mix(fast: str, safe: str, sizes: dict[str, int], kl_of: Callable[[Mix], float | None], *,
               target: float, stop: Callable[[], bool] = lambda: False) -> MixSearch:
    """Greedy: one class at a time to rank them, then the ranked classes cumulatively until
    the mix's KL ≤ target. `kl_of` returns None when a mix cannot be measured (memory)."""
    s = MixSearch(fast, safe, target)
    base = kl_of(Mix(fast, safe, ()))
    if base is None:
        return s
    s.kl[Mix(fast, safe, ()).name] = base
    saved: dict[str, float] = {}
    for cls in sorted(sizes):
        if stop():
            return s
        m = Mix(fast, safe, (cls,))
        v = kl_of(m)
        if v is None:
            return s
        s.kl[m.name] = v
        # one class is enough: the least weight moved that gets there wins
        if v <= target and (s.chosen is None or sizes[cls] < sizes[s.chosen.take[0]]):
            s.chosen = m
        saved[cls] = base - v
    if s.chosen is not None:
        s.order = [s.chosen.take[0]]
        return s
    s.order = sorted((c for c in saved if saved[c] > 0), key=lambda c: -saved[c] / sizes[c])
    for i in range(2, len(s.order) + 1):
        if stop():
            break
        m = Mix(fast, safe, tuple(sorted(s.order[:i])))
        v = kl_of(m)
        if v is None:
            break
        s.kl[m.name] = v
        if v <= target:
            s.chosen = m
            break
    return s
