"""The code's shape (issue 13): imports run downward, one definition of each shared thing,
no function longer than 80 lines. Read with ast, so nothing is imported or run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge", "bias")

# Base modules: the bottom layer, importing only each other (and no llama.cpp session).
BASE = {"edge", "edge.errors", "edge.paths", "edge.system", "edge.device", "edge.gguf_file",
        "edge.catalog", "edge.telemetry", "edge.cvec", "edge.sampling", "edge.netaddr",
        "edge.hostcheck", "edge.logprobs", "edge.interrupt"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every edge/bias module `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            cands = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in MODULES:
                c = c.rpartition(".")[0]
            if c and c != name:
                found.add(c)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    # a package's __init__ importing its own submodules is not a cycle of the design
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in GRAPH.items()}
    assert _cycle(graph) is None, " → ".join(_cycle(graph) or [])


def test_edge_never_imports_bias():
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "bias")
           for m, deps in GRAPH.items() if m.split(".")[0] == "edge" and not m.startswith("edge.cli")}
    assert {m: d for m, d in bad.items() if d} == {}, "only the CLI (edge.cli.bias) sits above both"


def test_base_modules_import_only_base_modules():
    for m in BASE:
        above = sorted(d for d in GRAPH[m] if d not in BASE)
        assert not above, f"{m} is a base module but imports {above}"


def test_engine_does_not_import_the_llamacpp_session():
    for m, deps in GRAPH.items():
        if m.startswith("edge.engine"):
            assert "edge.runtime" not in deps and "edge.session" not in deps, m


def _sources() -> dict[str, str]:
    return {m: p.read_text() for m, p in MODULES.items()}


@pytest.mark.parametrize("what, pattern, home", [
    ("sampling chain", r"^def (penalize|chain|top_k|sample_rows)\(", "edge.sampling"),
    ("control-vector application", r"llama_set_adapter_cvec\(", "edge.llamacpp"),
    ("context creation", r"llama_init_from_model\(", "edge.llamacpp"),
    ("token piece", r"llama_token_to_piece\(", "edge.llamacpp"),
    ("end-of-generation test", r"llama_vocab_is_eog\(", "edge.llamacpp"),
    ("chat template rendering", r"Jinja2ChatFormatter\(", "edge.generation"),
    ("chat-or-raw prompt", r"has_chat_template\b(?!\(self\))", "edge.generation"),
    ("run-log reader", r"^def read_records\(.*kind", "edge.telemetry"),
    ("streaming loop", r"getincrementaldecoder\(", "edge.generation"),
])
def test_one_definition_each(what, pattern, home):
    rx = re.compile(pattern, re.M)
    where = sorted(m for m, src in _sources().items() if rx.search(src) and m != "edge.gguf_file")
    assert where == [home], f"{what} is written in {where}; it belongs in {home} only"


def test_no_function_over_80_lines():
    long = []
    for m, p in MODULES.items():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                long.append(f"{m}.{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_non_python_files_ship_in_the_wheel():
    # A Pi installs edge without -e: a source file the code reads at run time must be package data.
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {f"{pkg.replace('.', '/')}/{name}" for pkg, names in data.items() for name in names}
    found = {str(p.relative_to(ROOT)) for d in ("edge", "bias") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix not in {".py", ".pyc", ".so"} and "__pycache__" not in p.parts}
    assert found <= shipped
