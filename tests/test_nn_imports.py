"""The modules of kexue_jax/nn import each other without a circle (read from their source, imports inside
functions included)."""
import ast
from pathlib import Path

import kexue_jax.nn

PACKAGE = "kexue_jax.nn"
NN_DIR = Path(kexue_jax.nn.__file__).parent


def _edges(name: str, modules: set, source: str | None = None) -> set:
    """The modules of the package that module ``name`` imports (``__init__``: a name taken from the package)."""
    out = set()
    source = (NN_DIR / f"{name}.py").read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: "." is this package
                base = PACKAGE + ("." + base if base else "")
            if base == PACKAGE:
                out |= {a.name if a.name in modules else "__init__" for a in node.names}
                continue
            targets = [base]
        else:
            continue
        out |= {t[len(PACKAGE) + 1:].split(".")[0] for t in targets if t.startswith(PACKAGE + ".")}
    return out & modules - {name}


def _cycle(graph: dict) -> list | None:
    """One import circle of ``graph`` (module -> imported modules), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle_in_nn():
    modules = {p.stem for p in NN_DIR.glob("*.py")}
    graph = {m: _edges(m, modules) for m in modules}
    assert "activations" in graph["mixers"] and "activations" in graph["transformer"]
    assert "mixers" in graph["transformer"]
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_checker_sees_a_circle_through_a_function_level_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    modules = {"transformer", "mixers", "norms", "init"}
    source = ("from kexue_jax.nn import init as initializers\nfrom . import norms\n\n\n"
              "def f():\n    from kexue_jax.nn.transformer import ACTIVATIONS\n")
    assert _edges("mixers", modules, source) == {"init", "norms", "transformer"}
    graph = {"mixers": _edges("mixers", modules, source), "transformer": {"mixers"}, "norms": set(), "init": set()}
    assert _cycle(graph) == ["mixers", "transformer", "mixers"]


def test_activations_still_importable_from_transformer():
    from kexue_jax.nn import activations, transformer
    assert transformer.ACTIVATIONS is activations.ACTIVATIONS
    assert transformer.HOMOGENEOUS_ACTIVATIONS == ("relu", "linear")
