"""The shape docs/architecture.md describes, checked: no import circle (lazy imports inside functions
count too), the ground floor imports nothing from the package, modules stay small, entry scripts thin,
and neither the loop nor the tools branch on a method's name."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dist_glm"
MAX_MODULE_LINES = 450
MAX_LAUNCH_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules `path` imports anywhere in its body (`from a import b` counts a.b when that is a
    module, else a)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dist_glm"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dist_glm"))
    return out - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    # Importing a.b runs a's __init__ first; a package's own __init__ importing its children is not a circle.
    return {module_name(f): {m for m in imports_of(f, modules) if m != "dist_glm"} for f in files}


def test_no_import_circle():
    graph = import_graph()
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        assert module not in visiting, "import circle: " + " -> ".join(visiting[visiting.index(module) :] + [module])
        visiting.append(module)
        for target in graph.get(module, ()):
            if not (module.startswith(target + ".") or target.startswith(module + ".")):  # package <-> child
                visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_ground_floor_imports_nothing_upward():
    graph = import_graph()
    assert graph["dist_glm.errors"] == set()
    assert graph["dist_glm.options"] == {"dist_glm.errors", "dist_glm.llamafactory"}
    assert graph["dist_glm.config"] == {"dist_glm.errors", "dist_glm.options"}
    assert graph["dist_glm.llamafactory"] == set()
    assert graph["dist_glm.runtime.doctor"] == set()


def test_modules_are_small_and_entry_scripts_thin():
    big = {f.name: n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, big
    fat = {
        f.name: n for f in (REPO / "launch").glob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LAUNCH_LINES
    }
    for tool in ("benchmark_memory.py", "build_demo_assets.py", "gpu_check.py"):  # tools of their own, not entries
        fat.pop(tool, None)
    assert not fat, fat


def test_nothing_outside_methods_branches_on_a_method_name():
    pattern = re.compile(r"art\.method\s*(==|!=|in)|finetuning_type\s*(==|!=|in)\s*[\"'(\[]|method\s*==\s*[\"']")
    hits = [
        f"{f.relative_to(REPO)}:{i}: {line.strip()}"
        for f in PACKAGE.rglob("*.py")
        if "methods" not in f.parts
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
