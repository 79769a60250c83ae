"""The native engine against llama.cpp on the same GGUF: top-1 agreement and mean KL over
512 tokens of documentation text (acceptance: top-1 ≥ 97%, mean KL ≤ 0.01).
Usage: python benchmarks/engine_agreement.py [MODEL] [--tokens 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from texts import EVAL_MODULES, doc_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    from edge.catalog import resolve_model
    from edge.engine import Engine
    from edge.engine.verify import agreement
    from edge.runtime import Runtime, RuntimeConfig

    path = resolve_model(args.model)
    engine = Engine.from_gguf(path)
    rt = Runtime(path, RuntimeConfig(n_ctx=max(1024, args.tokens)))
    tokens = rt.tokenize(doc_text(EVAL_MODULES))[: args.tokens]
    a = agreement(engine, rt, tokens)
    print(f"{path.name}: {a.n_tokens} tokens, top-1 agreement {a.top1:.2%}, mean KL {a.mean_kl:.4f}, "
          f"max KL {a.max_kl:.4f}")


if __name__ == "__main__":
    main()
