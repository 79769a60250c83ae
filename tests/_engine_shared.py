"""One loaded native engine of the bundled model, shared by the engine and sparse tests."""

from __future__ import annotations

import collections
import functools
import pydoc


@functools.lru_cache(maxsize=1)
def bundled_engine():
    from edge.catalog import default_entry
    from edge.engine import Engine

    return Engine.from_gguf(default_entry().local_path)


def doc_text() -> str:
    """Neutral English text from the standard library's own documentation (never downloaded)."""
    import json

    return pydoc.getdoc(collections) + "\n\n" + pydoc.getdoc(json) + "\n\n" + pydoc.getdoc(functools)
