"""Item and suite records shared by the loaders, and the download cache."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge.errors import DownloadError, SuiteError
from edge.paths import atomic_write, edge_home


@dataclass(frozen=True)
class PairItem:
    """A contrastive pair: `more` is the more stereotyping sentence (CrowS-Pairs, probes)."""

    id: str
    row: int  # 0-based data row in the source file
    category: str
    more: str
    less: str
    direction: str = "stereo"  # stereo | antistereo (CrowS-Pairs `stereo_antistereo`)


@dataclass(frozen=True)
class BBQItem:
    id: str
    row: int
    category: str
    context: str
    question: str
    answers: tuple[str, str, str]
    label: int
    ambiguous: bool
    polarity: str  # neg | nonneg
    target: int  # index of the answer naming the stereotyped group
    unknown: int  # index of the "can't be determined" answer


@dataclass(frozen=True)
class StereoSetItem:
    id: str
    row: int
    category: str
    context: str
    stereo: str
    anti: str
    unrelated: str


@dataclass
class Suite:
    name: str
    kind: str  # pairs | bbq | stereoset
    items: list[Any]
    source: str
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)  # 1-based line numbers

    def head(self, n: int) -> Suite:
        return replace(self, items=self.items[:n])

    def spread(self, n: int) -> Suite:
        """n items, each category's share of them as in the whole suite (largest remainder,
        ties to the category met first), its first items, kept in file order. For files that
        group items by category (BBQ's one file per category), where the first n would be one
        category alone."""
        if n >= len(self.items):
            return self
        sizes: dict[str, int] = {}
        for it in self.items:
            sizes[it.category] = sizes.get(it.category, 0) + 1
        exact = {c: n * k / len(self.items) for c, k in sizes.items()}
        quota = {c: int(x) for c, x in exact.items()}
        order = list(sizes)
        for c in sorted(order, key=lambda c: (quota[c] - exact[c], order.index(c)))[:n - sum(quota.values())]:
            quota[c] += 1
        items = []
        for it in self.items:
            if quota[it.category] > 0:
                items.append(it)
                quota[it.category] -= 1
        return replace(self, items=items)

    def subset(self, indices: list[int]) -> Suite:
        return replace(self, items=[self.items[i] for i in indices])

    @property
    def categories(self) -> list[str]:
        return sorted({it.category for it in self.items})


def bad_row(suite: str, path: Path, line: int, why: str, strict: bool, skipped: list[int]) -> None:
    if strict:
        raise SuiteError(f"{path}:{line}: malformed {suite} row ({why}); fix or remove that line")
    skipped.append(line)


def cached(name: str, url: str) -> Path:
    """The local copy of a public data file, downloaded once into $EDGE_HOME/data/."""
    dest = edge_home() / "data" / name
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=60) as r, atomic_write(dest, "wb") as f:
            while chunk := r.read(1 << 16):
                f.write(chunk)
    except OSError as e:
        raise DownloadError(
            f"could not download {url} ({e}); pass a local copy as --suite NAME:PATH"
        ) from None
    return dest


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SuiteError(f"{what} not found at {path}; check the path after NAME:")
    return path
