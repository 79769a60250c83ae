"""Counterfactual pairs for the learned edit: one calibration sentence's context with another
pair's group terms (`--method learn`, LearnConfig.swaps).

Most CrowS-Pairs rows (1,270 of 1,508) differ in one run of words, the group term ("black" /
"white", "gay" / "straight"). Putting pair j's two terms into pair i's context, within a
category, gives a new pair whose difference should be as near 0 as the originals': n pairs
of a category give up to n(n − 1), so the fit sees each contrast in many contexts instead of
memorising the few it has (on the bundled model the calibration pairs shrank 20 times as
much as held-out ones). Only calibration rows are read: no held-out sentence or term leaks.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

_PUNCT = ".,;:!?\"')"


@dataclass(frozen=True)
class Slot:
    """A pair as a context with one slot, and the two terms that fill it."""

    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    more: str
    less: str
    tail: str = ""  # punctuation both terms carried ("black." / "white."), kept after the slot

    def fill(self, more: str, less: str) -> tuple[str, str]:
        return self._put(more), self._put(less)

    def _put(self, term: str) -> str:
        if not self.prefix:  # the slot starts the sentence
            term = term[:1].upper() + term[1:]
        elif self.more[:1].islower() and self.less[:1].islower():
            term = (
                term[:1].lower() + term[1:]
                if term[:1].isupper() and term[1:2].islower() and _lead(term)
                else term
            )
        return " ".join((*self.prefix, term + self.tail, *self.suffix))


def _lead(term: str) -> bool:
    """A word capitalised only because it began its sentence (common words: "Old", "Poor")."""
    return term.split()[0].lower() in _COMMON


# group terms that are common words, lower-cased when moved off a sentence's start;
# proper nouns and nationalities ("Mexican", "Jewish") keep their capital
_COMMON = frozenset(("old", "young", "elderly", "poor", "rich", "wealthy", "gay", "straight",
                     "black", "white", "women", "men", "woman", "man", "he", "she", "his", "her",
                     "fat", "thin", "ugly", "short", "tall", "the", "a", "an", "people"))


def slot(more: str, less: str) -> Slot | None:
    """The pair's one differing run of words as a slot (trailing punctuation both share goes
    to the context), or None when the two differ in more than one place."""
    a, b = more.split(), less.split()
    ops = [
        o
        for o in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
        if o[0] != "equal"
    ]
    if len(ops) != 1 or ops[0][0] != "replace":
        return None
    _, i1, i2, j1, j2 = ops[0]
    tm, tl = " ".join(a[i1:i2]), " ".join(b[j1:j2])
    tail = ""
    while tm and tl and tm[-1] == tl[-1] and tm[-1] in _PUNCT:
        tail, tm, tl = tm[-1] + tail, tm[:-1], tl[:-1]
    if not tm or not tl:
        return None
    return Slot(tuple(a[:i1]), tuple(a[i2:]), tm, tl, tail)


def swapped_pairs(
    categories: list[str], more: list[str], less: list[str], per_pair: int, seed: int = 0
) -> list[tuple[str, str]]:
    """Up to `per_pair` new pairs for each pair: its context, another same-category pair's
    terms (a different contrast from its own)."""
    return [p for _, p in sourced_swaps(categories, more, less, per_pair, seed)]


def sourced_swaps(
    categories: list[str], more: list[str], less: list[str], per_pair: int, seed: int = 0
) -> list[tuple[int, tuple[str, str]]]:
    """swapped_pairs, each with the index of the pair whose context it fills (its category)."""
    rng = np.random.default_rng(seed)
    slots = [slot(m, le) for m, le in zip(more, less, strict=True)]
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, (c, s) in enumerate(zip(categories, slots, strict=True)):
        if s is not None:
            by_cat[c].append(i)
    out: list[tuple[int, tuple[str, str]]] = []
    for i, s in enumerate(slots):
        if s is None:
            continue
        own = (s.more.lower(), s.less.lower())
        others = [
            j
            for j in by_cat[categories[i]]
            if (sj := slots[j]) is not None and (sj.more.lower(), sj.less.lower()) != own
        ]
        for j in rng.permutation(others)[:per_pair]:
            sj = slots[int(j)]
            assert sj is not None
            out.append((i, s.fill(sj.more, sj.less)))
    return out
