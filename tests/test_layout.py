"""The house's layout: no import cycle among qmoe's modules, and no family named outside its own file."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders installed under qmoe (pyproject's package-dir), and qmoe itself.
PACKAGES = {"qmoe": ROOT / "qmoe", "qmoe.kernels": ROOT / "kernels", "qmoe.codec": ROOT / "codec",
            "qmoe.workers": ROOT / "workers"}
FAMILY_FILES = {"switch.py", "mixtral.py", "qwen3_moe.py", "deepseek_v3.py", "gpt_oss.py"}
# A family's names: its model_type, its stacks and their module paths, its tensors' names on disk.
FAMILY_WORDS = re.compile(r"\b(switch_transformers|mixtral|qwen3_moe|deepseek_v3|kimi_k2|gpt_oss|enc_ids|dec_ids|"
                          r"gate_up_proj|block_sparse_moe|kv_b_proj|e_score_correction)\b|^(encoder|decoder|wi|wo)$|"
                          r"(encoder|decoder)\.(block|final_layer_norm)|\.w[io]\.")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            if pkg == "qmoe" and f.relative_to(folder).parts[0] in ("kernels", "codec", "workers"):
                continue
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, f: Path, modules: dict[str, Path]) -> set[str]:
    """The qmoe modules a module imports (at its top or inside functions)."""
    pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return out


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in state:
                visit(n, path + [m] if path and path[-1] != m else path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _family_names(f: Path) -> list[str]:
    """String constants (not docstrings) that name a family or its tensors."""
    tree = ast.parse(f.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [f"{f.name}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
            and FAMILY_WORDS.search(n.value)]


def test_no_family_named_outside_its_file():
    found = []
    for m, f in sorted(_modules().items()):
        if not (f.parent.name == "models" and f.name in FAMILY_FILES):
            found += _family_names(f)
    assert not found, "family names outside their family's file:\n" + "\n".join(found)
