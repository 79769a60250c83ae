"""Neutral English text for calibration and evaluation, from the standard library's own
documentation (pydoc), so nothing is downloaded. Two disjoint module sets: calibrate on
one, evaluate on the other."""

from __future__ import annotations

import importlib
import pydoc

CALIB_MODULES = ("typing", "argparse", "logging", "subprocess", "threading", "pathlib", "asyncio",
                 "dataclasses", "unittest", "email", "http.client", "sqlite3")
EVAL_MODULES = ("collections", "json", "functools", "itertools", "os", "re", "string", "datetime",
                "decimal", "csv", "tarfile", "zipfile", "inspect", "pickle", "socket", "shutil")


def doc_text(modules: tuple[str, ...]) -> str:
    parts = []
    for m in modules:
        doc = pydoc.getdoc(importlib.import_module(m))
        if doc:
            parts.append(doc)
    return "\n\n".join(parts)
