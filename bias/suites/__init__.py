"""Bias suites: CrowS-Pairs, BBQ, StereoSet and the project's own probes.

`load_suite("crows_pairs:/path/file.csv")` → a `Suite` of items. A suite without a path is
read from `$EDGE_HOME/data/` (downloaded from its public source on first use); the
probes are built in. Malformed rows are skipped and counted (their line numbers kept),
or rejected with the line number under `strict=True`; an empty suite is an error.
"""

from __future__ import annotations

from pathlib import Path

from bias.suites.base import BBQItem, PairItem, StereoSetItem, Suite
from edge.errors import SuiteError

SUITES = ("crows_pairs", "bbq", "stereoset", "probes")
ALIASES = {"crows": "crows_pairs", "crows-pairs": "crows_pairs", "crowspairs": "crows_pairs",
           "probe": "probes", "edge_probes": "probes"}


# suites whose --limit takes each category's share (Suite.spread) rather than the first rows
SPREAD = ("bbq", "probes")


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """'NAME' or 'NAME:PATH' → (canonical name, path or None)."""
    name, _, path = spec.partition(":")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in SUITES:
        raise SuiteError(f"unknown suite {name!r}; use one of {', '.join(SUITES)} (optionally NAME:PATH)")
    return name, (Path(path).expanduser() if path else None)


def load_suite(spec: str, *, strict: bool = False, limit: int | None = None) -> Suite:
    name, path = parse_spec(spec)
    if name == "crows_pairs":
        from bias.suites.crows_pairs import load
    elif name == "bbq":
        from bias.suites.bbq import load
    elif name == "stereoset":
        from bias.suites.stereoset import load
    else:
        from bias.suites.probes import load
    suite = load(path, strict=strict)
    if not suite.items:
        raise SuiteError(f"suite {spec!r} has no usable rows ({suite.skipped} malformed); "
                         "check the file is the right format")
    if limit is not None:  # BBQ and the probes group their items by category: the first n would skip most
        suite = suite.spread(limit) if name in SPREAD else suite.head(limit)
    return suite


__all__ = ["SUITES", "BBQItem", "PairItem", "StereoSetItem", "Suite", "load_suite", "parse_spec"]
